"""The Python API: zsq.quantize -> zsq.save -> zsq.load round trips bit for bit, the saved integer
weights are real low-bit codes, W4 models are small, and fewer bits cost accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zsq
from zsq.errors import DataError
from zsq.quant.modules import QUANT_LAYERS
from zsq.record import record_of

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
TEST_TAR = ASSETS / "cifar10-jpeg" / "test.tar"
TRAIN_TAR = ASSETS / "cifar10-jpeg" / "train.tar"


@pytest.fixture(scope="module", params=["ptq", "genie-native"])
def saved(request, resnet20, tmp_path_factory):
    """W4A4 ResNet-20 (Gaussian-noise min-max calibration, smoke budget) saved to OUT."""
    q = zsq.quantize(resnet20, "minmax-noise", 4, 4, protocol=request.param, budget="smoke", progress=False)
    out = tmp_path_factory.mktemp(f"api-{request.param}") / "out"
    zsq.save(q, out)
    return q, out


def test_save_load_round_trip_is_exact(saved, real_batch):
    q, out = saved
    q2 = zsq.load(out)
    sd, sd2 = q.state_dict(), q2.state_dict()
    assert list(sd) == list(sd2)
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == sd2[k].dtype and torch.equal(v, sd2[k]), k
        else:  # quantizer configuration (_extra_state)
            assert v == sd2[k], k
    assert record_of(q2).layout.to_dict() == record_of(q).layout.to_dict()
    assert record_of(q2).result["protocol"] == record_of(q).result["protocol"]
    assert record_of(q2).result["bits"] == {"w": 4, "a": 4}
    x, _ = real_batch
    with torch.inference_mode():
        y, y2 = q(x), q2(x)
    assert torch.equal(y, y2)
    doc = json.loads((out / "zsq.json").read_text())
    assert doc["protocol"] == record_of(q).result["protocol"] and doc["synthetic"]["kind"] == "synthetic"


def test_qmodel_pt_loads_weights_only(saved):
    q, out = saved
    payload = torch.load(out / "qmodel.pt", map_location="cpu", weights_only=True)
    assert payload["format"] == "zsq-qmodel-1"
    assert payload["model"]["id"] == "cifar10_resnet20"
    assert payload["layout"]["protocol"] == record_of(q).result["protocol"]
    assert set(payload["state_dict"]) == set(q.state_dict())
    assert set(payload["int_weights"]) == {n for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS)}


def test_int_weights_are_low_bit_codes_of_the_fake_quant_weights(saved):
    q, out = saved
    payload = torch.load(out / "qmodel.pt", map_location="cpu", weights_only=True)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS)}
    names = list(layers)
    bits_seen = set()
    for name, m in layers.items():
        codes = payload["int_weights"][name]
        bits = record_of(q).layout.weights[name]
        assert bits == (8 if name in (names[0], names[-1]) else 4), name  # first conv / last linear at W8
        assert m.wq.bits == bits
        assert not codes.is_floating_point() and codes.shape == m.weight.shape
        assert int(codes.min()) >= m.wq.qmin and int(codes.max()) <= m.wq.qmax
        per_channel = [row.unique().numel() for row in codes.reshape(codes.shape[0], -1)]
        assert max(per_channel) <= 2**bits, name
        if codes[0].numel() >= 4 * 2**bits:  # enough weights per channel to fill the grid
            assert max(per_channel) > 2 ** (bits - 1), name  # min-max ranges use the grid
        # dequantizing the stored codes gives the weights the fake-quant model computes with; the
        # formula is the same, so only float rounding may differ: rtol 0, atol 1e-6, and at most a
        # thousandth of a quantization step per channel (some channels have tiny steps)
        shape = [-1] + [1] * (codes.dim() - 1)
        scale = payload["state_dict"][f"{name}.wq.scale"].view(shape)
        zp = payload["state_dict"][f"{name}.wq.zero_point"].view(shape)
        with torch.no_grad():
            fq = m.wq(m.weight)
        dq = (codes.float() - zp) * scale
        torch.testing.assert_close(dq, fq, rtol=0, atol=1e-6)
        assert float(((dq - fq).abs() / scale).max()) <= 1e-3, name
        bits_seen.add(bits)
    assert bits_seen == {4, 8}


def test_w4_model_is_under_a_quarter_of_fp(saved):
    q, out = saved
    size = record_of(q).result["size"]
    assert 0 < size["q_bytes"] < size["fp_bytes"] / 4, size
    assert json.loads((out / "zsq.json").read_text())["size"] == size


def test_load_refuses_an_incomplete_output(saved, tmp_path):
    _, out = saved
    (tmp_path / "qmodel.pt").write_bytes((out / "qmodel.pt").read_bytes())  # no zsq.json: unfinished
    with pytest.raises(DataError, match="not a finished zsq output"):
        zsq.load(tmp_path)


def test_w2a2_scores_clearly_below_w8a8(resnet20):
    top1 = {}
    for bits in (8, 2):
        q = zsq.quantize(resnet20, "minmax-noise", bits, bits, budget="smoke", calib=str(TRAIN_TAR), calib_n=128,
                         progress=False)
        assert record_of(q).result["synthetic"]["kind"] == "real"
        top1[bits] = zsq.evaluate(q, str(TEST_TAR), limit=1000, progress=False)["top1"]
    assert top1[8] >= 78.0, top1  # FP: 80.40 on this subset
    assert top1[2] < top1[8] - 20.0, top1


def test_real_calibration_is_recorded(resnet20, tmp_path):
    q = zsq.quantize(resnet20, "minmax-noise", 4, 4, budget="smoke", calib=str(TRAIN_TAR), calib_n=64,
                     progress=False)
    syn = record_of(q).result["synthetic"]
    assert syn["kind"] == "real" and syn["n_images"] == 64 and syn["dir"] == str(TRAIN_TAR)
    assert record_of(q).result["recipe"]["synth"] is None  # nothing was synthesized
    zsq.save(q, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "zsq.json").read_text())["synthetic"]["kind"] == "real"


def test_resolve_applies_budget_then_user_hparams():
    """zeroq's `paper` budget keeps the official min-max weights, `default` searches them; --set
    (hparams=) wins over both; a key no quantizer reads is refused with a suggestion."""
    from zsq.api import resolve
    from zsq.errors import UnknownNameError

    assert resolve("zeroq", budget="paper").hparams["w_observer"] == "minmax"
    assert resolve("zeroq", budget="default").hparams["w_observer"] == "mse"
    assert resolve("zeroq", hparams={"w_observer": "percentile"}).hparams["w_observer"] == "percentile"
    assert resolve("genie", hparams={"iters": 7}).hparams["iters"] == 7  # a ReconConfig field
    with pytest.raises(UnknownNameError, match="did you mean iters"):
        resolve("genie", hparams={"itres": 7})
    # BRECQ's activation-pass keys belong to brecq only: genie used to accept lr_a and ignore it
    assert resolve("brecq", hparams={"lr_a": 0.0}).hparams["lr_a"] == 0.0
    with pytest.raises(UnknownNameError):
        resolve("genie", hparams={"lr_a": 0.0})


def test_synth_overrides_sit_on_the_budget_and_are_recorded(resnet20):
    """``synth_overrides`` (--synth-set) go on top of the recipe's budget, n_images included, are checked
    against the synthesizer's config, change the cache key, and are recorded in zsq.json."""
    from zsq.api import resolve, synth_settings
    from zsq.errors import BadValueError

    res = resolve("genie", budget="default")
    base, n = synth_settings(res)
    more, n2 = synth_settings(res, {"iters": base.get("iters", 300) + 100, "n_images": 64})
    assert n2 == 64 and more["iters"] == base.get("iters", 300) + 100
    assert {k: v for k, v in more.items() if k != "iters"} == {k: v for k, v in base.items() if k != "iters"}
    with pytest.raises(BadValueError, match="did you mean iters"):
        synth_settings(res, {"itres": 1})
    with pytest.raises(BadValueError, match="no synthesizer"):
        synth_settings(resolve("squant"), {"iters": 1})
    q = zsq.quantize(resnet20, "minmax-noise", 8, 8, budget="smoke", progress=False, synth_overrides={"n_images": 16})
    q0 = zsq.quantize(resnet20, "minmax-noise", 8, 8, budget="smoke", progress=False)
    r, r0 = record_of(q).result, record_of(q0).result
    assert r["synthetic"]["n_images"] == 16 != r0["synthetic"]["n_images"]
    assert r["recipe"]["synth_overrides"] == {"n_images": 16}
    assert "synth_overrides" not in r0["recipe"] and r["synthetic"]["dir"] != r0["synthetic"]["dir"]


def test_zeroq_smoke_end_to_end(resnet20, real_batch):
    """The zeroq recipe through the API on its smoke budget: distilled images, then L_p weights and
    min-max activations (the default/smoke quantizer); W4A8 keeps most of the FP predictions."""
    q = zsq.quantize(resnet20, "zeroq", 4, 8, protocol="ptq", budget="smoke", progress=False)
    r = record_of(q).result
    assert r["recipe"]["synth"] == "zeroq" and r["recipe"]["hparams"]["w_observer"] == "mse"
    assert r["synthetic"]["kind"] == "synthetic" and r["synthetic"]["n_images"] > 0
    x, _ = real_batch
    with torch.inference_mode():
        agree = (q(x).argmax(1) == resnet20(x).argmax(1)).float().mean()
    assert agree >= 0.85, float(agree)
