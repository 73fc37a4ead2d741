"""bench/valsplit.py: fidelity's top-1 is evaluate's, agreement / KL are exact against the FP model itself,
and the FP model's pass is cached per process without mixing up models or splits."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import valsplit  # noqa: E402

from conftest import CIFAR_TEST, load_bench_script  # noqa: E402
from zsq.record import model_info  # noqa: E402


def test_fidelity_top1_matches_evaluate_and_is_exact_against_itself(resnet20, one_thread):
    import zsq
    from zsq.data.eval import open_dataset

    ds = open_dataset(CIFAR_TEST, model_info(resnet20).preprocess, limit=200)
    q = zsq.quantize(resnet20, "minmax-noise", 3, 3, protocol="genie-native", budget="smoke", progress=False)
    valsplit._FP_CACHE.clear()
    f = valsplit.fidelity(resnet20, q, ds, n_hard=50, batch_size=64)
    assert f["val_n"] == 200 and f["hard_n"] == 50
    assert f["val_top1"] == zsq.evaluate(q, ds, progress=False)["top1"]
    assert f["val_fp_top1"] == zsq.evaluate(resnet20, ds, progress=False)["top1"]
    assert f["val_kl"] > 0 and f["val_agree"] < 100  # W3A3 min-max is far from FP
    assert len(valsplit._FP_CACHE) == 1
    # against itself: full agreement, zero KL, hard-image top-1 = the FP model's there; the cached FP pass
    # (another load of the same weights hits it) is the one q's pass reproduces
    again = zsq.load_model("cifar10_resnet20")
    s = valsplit.fidelity(again, resnet20, ds, n_hard=50, batch_size=64)
    assert len(valsplit._FP_CACHE) == 1
    assert s["val_agree"] == 100.0 and s["hard_agree"] == 100.0 and abs(s["val_kl"]) < 1e-5
    assert s["hard_top1"] == s["hard_fp_top1"] and s["val_top1"] == f["val_fp_top1"]
    # other weights or another split: their own entry
    with torch.no_grad():
        next(again.parameters()).mul_(0.5)
    valsplit.fidelity(again, q, ds, n_hard=50, batch_size=64)
    valsplit.fidelity(resnet20, q, open_dataset(CIFAR_TEST, model_info(resnet20).preprocess, limit=100), n_hard=10)
    assert len(valsplit._FP_CACHE) == 3
    valsplit._FP_CACHE.clear()


def test_genie_validation_settings_are_valid_configs():
    """Every synthetic-set setting of bench/genie_validation.py builds its synthesizer's `default` config (a
    typo in an override fails here, not an hour into a run), and every experiment names a known setting."""
    from zsq.synth import SYNTHESIZERS

    mod = load_bench_script("genie_validation")
    for name, ov in mod.SYNTH.items():
        if ov is None:  # real images
            continue
        ov = dict(ov)
        ov.pop("n_images", None)
        cfg = SYNTHESIZERS[ov.pop("synth", "genie")].Config.for_budget("default", **ov)
        assert all(getattr(cfg, k) == v for k, v in ov.items()), name
    assert all(s in mod.SYNTH and r in mod.RECON for s, r, _, _ in mod.EXPERIMENTS.values())
    assert mod.EXPERIMENTS["sadagce1__p1000b8__W3A3__s1fid"] == ("sadagce1", "p1000b8", (3, 3), 1)
