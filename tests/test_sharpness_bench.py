"""bench/sharpness.py: the sharpness measurement (exact at rho = 0, restores the model, grows with rho)
and the PNGs it draws from its JSONs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sharpness as sb  # noqa: E402


@pytest.fixture(scope="module")
def qmodel(resnet20):
    import zsq

    return zsq.quantize(resnet20, "minmax-noise", 4, 4, protocol="genie-native", budget="smoke", progress=False)


def test_sharpness_exact_at_zero_restores_and_grows(qmodel, real_batch, one_thread):
    x, y = real_batch[0][:32], real_batch[1][:32]
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if isinstance(v, torch.Tensor)}
    r = sb.sharpness(qmodel, x, y, rhos=(0.0, 0.5), k=3, batch_size=16)
    assert r["layers"] > 10 and r["n"] == 32 and len(r["deltas"]) == 2 and len(r["deltas"][0]) == 3
    assert r["deltas"][0] == [0.0, 0.0, 0.0] and r["mean"][0] == 0.0 and r["std"][0] == 0.0
    assert r["mean"][1] > 0
    after = qmodel.state_dict()
    assert before.keys() == {k for k, v in after.items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("qweight" in m.__dict__ for m in qmodel.modules())
    # the same directions again: the same numbers (fixed seeds), and the model still evaluates as before
    assert sb.sharpness(qmodel, x, y, rhos=(0.5,), k=3, batch_size=16)["deltas"][0] == r["deltas"][1]
    # weights only: activation quantizers off meanwhile, switched back on after
    from zsq.quant.modules import quantizers

    modes = [q.mode for _, q in quantizers(qmodel)]
    w = sb.sharpness(qmodel, x, y, rhos=(0.0, 0.5), k=2, batch_size=16, act_quant=False)
    assert w["mean"][0] == 0.0 and w["mean"][1] > 0 and w["loss0"] != r["loss0"]
    assert [q.mode for _, q in quantizers(qmodel)] == modes and "off" not in modes
    assert all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items() if k in before)


def test_list_and_plots_from_json(resnet20, tmp_path, capsys):
    from zsq.synth import synthesize

    assert sb.main(["--list", "--bits", "W4A4,W3A3", "--budget", "smoke"]) == 0
    names = capsys.readouterr().out.split()
    assert len(names) == 8 and "sadag__W3A3__smoke__s0" in names
    sset = synthesize(resnet20, "gaussian", budget="smoke", n_images=64, progress=False)
    for i, src in enumerate(("noise", "zeroq")):
        sh = {"rho": list(sb.RHOS), "mean": [0.01 * (i + 1) * 2**j for j in range(len(sb.RHOS))],
              "std": [0.005] * len(sb.RHOS),
              "loss0": 0.3 + i, "top1": 90.0 - i, "n": 1000, "k": 8}
        rec = {"source": src, "bits": "W4A4", "budget": "smoke", "seed": 0, "sharpness": sh,
               "sharpness_weights_only": {**sh, "mean": [0.5 * v for v in sh["mean"]]},
               "synthetic": {"dir": str(sset.dir)}}
        (tmp_path / f"{src}__W4A4__smoke__s0.json").write_text(json.dumps(rec))
    assert sb.main(["--plots-only", "--out-dir", str(tmp_path), "--sources", "noise,zeroq", "--budget", "smoke"]) == 0
    for png in ("sharpness_W4A4.png", "images_noise.png", "images_zeroq.png"):
        with Image.open(tmp_path / png) as im:
            assert im.size[0] >= 400 and im.size[1] >= 250, (png, im.size)
            assert len(im.convert("L").getcolors(1 << 16) or []) > 20, png
    assert "| zeroq | W4A4 | smoke | 0 |" in capsys.readouterr().out
    # the report's section: smoke records are left out, the others rendered with every radius
    from conftest import load_bench_results

    sharpness_section = load_bench_results("sharpness").sharpness_section

    assert sharpness_section(tmp_path) == []
    rec["budget"] = "default"
    (tmp_path / "zeroq__W4A4__default__s0.json").write_text(json.dumps(rec))
    sec = "\n".join(sharpness_section(tmp_path))
    assert "## Sharpness" in sec and "| zeroq | W4A4 | default | 0 | 1.3000 | 89.0 |" in sec
    assert f"{0.02 * 2 ** (len(sb.RHOS) - 1):.4f} ± 0.0050" in sec and "| noise |" not in sec
