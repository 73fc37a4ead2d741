"""The ``deploy`` protocol (issue 37): a W8A8 export that ONNX Runtime runs as integer kernels, with
the same predictions as the PyTorch fake-quant model; recipes of every kind run under it; ``zsq export``
says when a result's protocol cannot become integer kernels."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import zsq
from zsq.export.onnx import OrtModel, export_onnx, export_summary, integer_kernel_note
from zsq.export.ortint import optimized_ops
from zsq.quant.modules import QUANT_LAYERS, Quantizer
from zsq.record import record_of


@pytest.fixture(scope="module")
def deploy_w8a8(resnet20, tmp_path_factory):
    torch.manual_seed(0)
    q = zsq.quantize(resnet20, "squant", 8, 8, protocol="deploy", progress=False)
    out = tmp_path_factory.mktemp("deploy") / "out"
    zsq.save(q, out)
    return q, out, export_onnx(q, out / "model.onnx")


def test_deploy_layout_is_integer_kernel_ready(deploy_w8a8):
    """Symmetric s8 per-channel weights (zero point 0); u8 activations at the input and output of every
    conv (the network input included), every residual add, the pooling and the classifier input."""
    q, _, _ = deploy_w8a8
    for name, m in q.named_modules():
        if isinstance(m, QUANT_LAYERS):
            assert m.wq.per_channel and m.wq.symmetric and (m.wq.qmin, m.wq.qmax) == (-128, 127), name
            assert torch.all(m.wq.zero_point == 0), name
    acts = {a.name: a.bits for a in record_of(q).layout.acts}
    assert "conv1.aq_in" in acts and "linear.aq_in" in acts and "pool.aq_out" in acts
    for blk in ("layer1.0", "layer2.0", "layer3.2"):
        assert {f"{blk}.relu1.aq_out", f"{blk}.bn2.aq_out", f"{blk}.relu2.aq_out"} <= set(acts), blk
    assert "layer2.0.shortcut.aq_out" in acts  # the option-A shortcut feeds the residual add
    assert set(acts.values()) == {8}
    # the network input keeps the range the preprocessing gives ((0 - mean) / std .. (1 - mean) / std)
    aq = q.conv1.aq_in
    lo, hi = (aq.qmin - aq.zero_point) * aq.scale, (aq.qmax - aq.zero_point) * aq.scale
    pre = zsq.record.model_info(q).preprocess
    assert float(lo) == pytest.approx(min(-m / s for m, s in zip(pre.mean, pre.std)), abs=float(aq.scale))
    assert float(hi) == pytest.approx(max((1 - m) / s for m, s in zip(pre.mean, pre.std)), abs=float(aq.scale))


def test_deploy_export_runs_as_integer_kernels(deploy_w8a8):
    """After ORT's optimisation every conv is a QLinearConv, every residual add a QLinearAdd, the
    classifier a QGemm and the pooling a QLinearGlobalAveragePool; the file says so in its metadata."""
    _, out, path = deploy_w8a8
    ops = optimized_ops(path.read_bytes())
    assert ops.get("QLinearConv") == 19 and ops.get("QLinearAdd") == 9, ops
    assert ops.get("QGemm") == 1 and ops.get("QLinearGlobalAveragePool") == 1, ops
    assert "Conv" not in ops and "Gemm" not in ops and "Add" not in ops, ops
    s = export_summary(path)
    assert s["protocol"] == "deploy" and s["ort_int_ops"] == 30 and s["ort_int_op_types"]["QLinearConv"] == 19
    assert integer_kernel_note(s) is None
    m = onnx.load(str(path))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    # no Clip anywhere: every grid equals its 8-bit container
    assert not [n for n in m.graph.node if n.op_type == "Clip"]


def test_deploy_onnxruntime_agrees_with_pytorch(deploy_w8a8, real_batch, tmp_path):
    """The integer model ONNX Runtime runs predicts what the PyTorch fake-quant model predicts (64 real
    images, batch 1 and 64: dynamic batch axis). Weights in u8 containers (``--int8-weights u8``): exact
    on every x86 CPU; ORT's u8 x s8 kernels saturate int16 pair sums on CPUs without VNNI (AVX2), which
    moves predictions (measured: 92% agreement). The QDQ graph itself (int32 bias, ORT's
    rounding) differs from the fake-quant model by a few activation steps: at most 2 of 64 flips."""
    q, _, _ = deploy_w8a8
    path = export_onnx(q, tmp_path / "u8.onnx", weights="u8")
    ops = optimized_ops(path.read_bytes())
    assert ops.get("QLinearConv") == 19 and ops.get("QGemm") == 1 and "Conv" not in ops, ops
    x, y = real_batch
    with torch.no_grad():
        ref = q(x)
    for batch in (1, 64):
        got = torch.cat([OrtModel(path, threads=1)(x[i:i + batch]) for i in range(0, len(x), batch)])
        assert int((got.argmax(1) != ref.argmax(1)).sum()) <= 2
        assert abs(int((got.argmax(1) == y).sum()) - int((ref.argmax(1) == y).sum())) <= 2
        torch.testing.assert_close(got, ref, rtol=0.0, atol=1.0)


def test_fixed_export_says_it_is_not_integer(resnet20, tmp_path):
    """``zsq export`` of a ``fixed`` result: one line (not an error) saying it cannot become integer
    kernels; zsq.json records the export's integer-op count."""
    from zsq.cli import app

    q = zsq.quantize(resnet20, "squant", 8, 8, protocol="fixed", progress=False)
    zsq.save(q, tmp_path / "out")
    r = CliRunner().invoke(app, ["export", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.output.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "--protocol deploy" in notes[0], r.output
    meta = json.loads((tmp_path / "out" / "zsq.json").read_text())
    e = meta["export"]["onnx"]
    assert e["protocol"] == "fixed" and 0 <= e["ort_int_ops"] < e["ort_ops"]


@pytest.mark.parametrize("recipe", ["minmax-noise", "dfq"])
def test_recipes_run_under_deploy(resnet20, recipe):
    """Recipes of two kinds (calibration on synthetic noise; synthesis-free with BN-statistics ranges, which
    read every deploy site's statistics: conv outputs through their folded BN, pooling, shortcuts, the
    network input) run under ``deploy`` at W4A8 and give a calibrated model laid out by it."""
    torch.manual_seed(0)
    q = zsq.quantize(resnet20, recipe, 4, 8, protocol="deploy", budget="smoke", progress=False,
                     synth_overrides={"n_images": 16} if recipe != "dfq" else None)
    layout = record_of(q).layout
    assert layout.protocol == "deploy"
    for name, m in q.named_modules():
        if isinstance(m, Quantizer) and m.mode != "off":
            assert m.initialized and torch.isfinite(m.scale).all(), name
    assert q.layer1[0].conv1.wq.symmetric and torch.all(q.layer1[0].conv1.wq.zero_point == 0)
    from zsq.data.eval import load_images

    x, y = load_images(str(__import__("conftest").CIFAR_TEST), zsq.record.model_info(q).preprocess, 64, seed=0)
    with torch.no_grad():
        acc = float((q(x).argmax(1) == y).float().mean())
    assert acc > 0.5, acc
    assert np.isfinite(acc)
