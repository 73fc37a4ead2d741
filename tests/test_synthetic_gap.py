"""bench/synthetic_gap.py's distances (issue 39 item 1): the MMD estimator and the class-balance entropy, and the
results section rendering a diagnosis row. Fast (< 5 s)."""

from __future__ import annotations

import json
import math

import torch
from conftest import load_bench_results, load_bench_script


def test_mmd2_rbf_zero_for_one_distribution_positive_when_shifted():
    mod = load_bench_script("synthetic_gap")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    y = torch.randn(200, 16, generator=g)
    same = mod.mmd2_rbf(x, y)
    assert abs(same) < 0.01  # two samples of one Gaussian: the unbiased estimate is about 0
    assert abs(mod.mmd2_rbf(x, x)) < 0.01  # identical sets
    shifted = mod.mmd2_rbf(x + 1.0, y)
    assert shifted > 0.1 and shifted > 20 * abs(same)
    assert mod.mmd2_rbf(x + 2.0, y) > shifted  # grows with the shift
    far = mod.mmd2_rbf(x + 100.0, y)  # nothing shared: k(x, y) = 0, only the within-set terms remain (<= 1 each)
    assert mod.mmd2_rbf(x + 2.0, y) < far <= 2.0
    # a fixed bandwidth is the one used; the median heuristic is the reference's median pairwise distance
    h = mod.median_bandwidth(y)
    assert mod.mmd2_rbf(x + 1.0, y, bandwidth=h) == shifted
    assert 4.0 < h < 7.0  # sqrt(2 * 16) ~ 5.7 for unit Gaussians in 16 dimensions


def test_class_entropy():
    mod = load_bench_script("synthetic_gap")
    assert math.isclose(mod.class_entropy(torch.arange(10).repeat(5), 10), math.log(10))
    assert mod.class_entropy(torch.zeros(20, dtype=torch.long), 10) == 0.0


def test_section_renders_rows(tmp_path):
    section = load_bench_results("synthetic_gap").synthetic_gap_section
    assert section(tmp_path) == []
    bn = {"names": ["bn1", "l.bn1", "l.bn2"], "mean": [0.1, 0.2, 0.3], "std": [0.1, 0.1, 0.1],
          "total": [0.2, 0.3, 0.4], "sum": 0.9}
    base = {"kind": "diag", "model": "cifar10_resnet20", "seed": 0, "n_images": 256, "bn": bn,
            "layers": ["a", "b", "c"], "confidence": 0.8, "class_entropy": 2.0, "class_counts": [1, 2, 3],
            "load_avg": 2.0}
    (tmp_path / "diag__s.json").write_text(json.dumps({**base, "name": "s", "set": "i300", "iters": 300,
                                                         "set_key": "genie-abc", "synth_wall_s": 10.0,
                                                         "mmd2": [0.01, 0.1, 0.05], "fp_top1_intended": None}))
    (tmp_path / "diag__r.json").write_text(json.dumps({**base, "name": "r", "set": "real", "iters": None,
                                                         "synth_wall_s": 0.0, "mmd2": [-0.001, 0.0, 0.0],
                                                         "fp_top1_intended": 85.0, "ref_bn": bn,
                                                         "ref_confidence": 0.95, "ref_class_entropy": 2.3,
                                                         "ref_fp_top1": 85.2}))
    text = "\n".join(section(tmp_path))
    assert "| ResNet-20 | Genie-D 300 it (default)" in text
    assert "0.1000 (b)" in text  # the largest block MMD^2 and its block
    assert "| l.bn2 | 0.4000 | 0.4000 | 0.4000 | 1.0x |" in text
    assert "largest BNS term at `l.bn2`" in text
