"""<= 4-bit Linear weights as ONNX Runtime's MatMulNBits (``zsq export --int4-weights matmulnbits``, issue 37
item 2), and mixed-bit results (issue 38) exported and run in ONNX Runtime like uniform ones."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import zsq
from zsq.export.nbits import block_size_for, pack_nbits
from zsq.export.onnx import OrtModel, export_onnx, export_summary
from zsq.export.ortint import optimized_ops
from zsq.models.vit import ViTConfig, VisionTransformer
from zsq.quant.modules import QUANT_LAYERS, weight_codes


def _unpack(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, n: int, k: int, block: int) -> np.ndarray:
    """MatMulNBits' dequantized weight [N, K] (the layout of ContribOperators.md), written independently."""
    nb = b.shape[1]
    codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, nb * block)[:, :k].astype(np.float64)
    if zp is None:
        z = np.full((n, nb), 8.0)
    else:
        z = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float64)
    s = scales.reshape(n, nb).astype(np.float64)
    blk = np.arange(k) // block
    return (codes - z[:, blk]) * s[:, blk]


@pytest.mark.parametrize("k,signed", [(192, True), (40, False), (384, False)])
def test_packing_is_the_per_channel_grid(k, signed):
    """Per-channel scale and zero point repeated over the blocks, odd block counts, a padded last block."""
    rng = np.random.default_rng(k)
    n = 6
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = rng.integers(lo, hi + 1, (n, k))
    z = np.zeros(n, dtype=np.int64) if signed else rng.integers(0, 16, n)
    s = rng.uniform(0.01, 0.1, n).astype(np.float32)
    shift = 8 if signed else 0
    block = block_size_for(k)
    assert block & (block - 1) == 0 and 16 <= block <= 256
    b, scales, zpk = pack_nbits((codes + shift).astype(np.uint8), (z + shift).astype(np.uint8), s, block)
    assert b.shape == (n, -(-k // block), block // 2) and scales.shape == (n * b.shape[1],)
    w = _unpack(b, scales, zpk, n, k, block)
    np.testing.assert_allclose(w, (codes - z[:, None]) * s[:, None].astype(np.float64), rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def small_vit():
    torch.manual_seed(0)
    return zsq.load_model(VisionTransformer(ViTConfig(depth=1, embed_dim=64, num_heads=2)).eval())


def _linears(q):
    return [n for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS) and isinstance(m, torch.nn.Linear)]


def test_matmulnbits_export_runs_in_ort_and_agrees(small_vit_w4a8, real_batch, tmp_path, one_thread):
    """W4A8 vit-ptq: every Linear a MatMulNBits after ORT's optimisation (no float MatMul on a weight left),
    its B / scales the layer's codes and grid, and ORT's logits those of the PyTorch fake-quant model
    (and of the standard INT4 QDQ export)."""
    q = small_vit_w4a8
    path = export_onnx(q, tmp_path / "nbits.onnx", int4_weights="matmulnbits")
    ref_path = export_onnx(q, tmp_path / "qdq.onnx")
    m = onnx.load(str(path))
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == len(_linears(q)) == 5  # qkv, proj, fc1, fc2, head
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    head = next(n for n in nodes if "head" in n.name)
    attrs = {a.name: a.i for a in head.attribute}
    w = _unpack(inits[head.input[1]], inits[head.input[2]], inits[head.input[3]] if len(head.input) > 3
                and head.input[3] else None, attrs["N"], attrs["K"], attrs["block_size"])
    wq = q.head.wq
    expect = ((weight_codes(wq, q.head.weight) - wq.zero_point[:, None]) * wq.scale[:, None]).double().numpy()
    np.testing.assert_allclose(w, expect, rtol=0, atol=1e-7)
    assert head.input[5] == "head.bias"  # the bias folded in as input 5
    ops = optimized_ops(path.read_bytes())
    assert ops.get("MatMulNBits") == 5 and "Gemm" not in ops, ops
    assert export_summary(path)["int4_weights"] == {"kind": "matmulnbits", "layers": 5}
    assert export_summary(ref_path).get("int4_weights") is None
    x = real_batch[0][:16]
    with torch.no_grad():
        want = q(x)
    got = OrtModel(path, threads=1)(x)
    qdq = OrtModel(ref_path, threads=1)(x)
    tol = 0.02 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol
    assert float((got - qdq).abs().max()) <= tol
    assert (got.argmax(1) == want.argmax(1)).sum() >= 15


@pytest.fixture(scope="module")
def small_vit_w4a8(small_vit):
    return zsq.quantize(small_vit, "minmax-noise", 4, 8, protocol="vit-ptq", budget="smoke", progress=False,
                        synth_overrides={"n_images": 16})


def test_cli_int4_weights(small_vit_w4a8, tmp_path, capsys, monkeypatch, one_thread):
    """``zsq export --int4-weights``: a bad value is one line and exit 2 (nothing written); ``matmulnbits``
    reaches the export and zsq.json records how many layers were written so."""
    from zsq import api
    from zsq.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "zsq.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["export", str(out), "--int4-weights", "int4"])
    text = capsys.readouterr()
    assert e.value.code == 2 and "--int4-weights" in text.out + text.err and "Traceback" not in text.out + text.err
    assert not (out / "model.onnx").exists()
    monkeypatch.setattr(api, "load", lambda path: small_vit_w4a8)  # a model the zoo cannot rebuild
    with pytest.raises(SystemExit) as e:
        main(["export", str(out), "--int4-weights", "matmulnbits", "-q"])
    assert e.value.code in (0, None)
    meta = json.loads((out / "zsq.json").read_text())
    assert meta["export"]["onnx"]["int4_weights"] == {"kind": "matmulnbits", "layers": 5}
    assert meta["export"]["onnx"]["ort_int_op_types"]["MatMulNBits"] == 5


def test_mixed_bit_result_exports_and_runs(small_vit, real_batch, tmp_path, one_thread):
    """Issue 38's mixed precision (``--wbits-avg 3``): per-layer 2/3/4/8-bit weights export like uniform ones
    (QDQ with INT4 / INT8 containers, and as MatMulNBits for the <= 4-bit Linear layers) and ONNX Runtime
    agrees with the PyTorch fake-quant model. Under ``ptq`` the weights are asymmetric: MatMulNBits gets
    its zero-point input."""
    q = zsq.quantize(small_vit, "minmax-noise", 4, 8, protocol="ptq", budget="smoke", progress=False,
                     synth_overrides={"n_images": 16}, mixed={"wbits_avg": 3, "n_images": 8})
    bits = {n: q.get_submodule(n).wq.bits for n in _linears(q)}
    assert len(set(bits.values())) > 1, bits  # really mixed
    x = real_batch[0][:16]
    with torch.no_grad():
        want = q(x)
    for kind in ("qdq", "matmulnbits"):
        path = export_onnx(q, tmp_path / f"{kind}.onnx", int4_weights=kind)
        meta = export_summary(path)
        assert set(meta["bits"]) >= set(bits.values())
        nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
        assert len(nodes) == (sum(b <= 4 for b in bits.values()) if kind == "matmulnbits" else 0)
        if kind == "matmulnbits":
            assert any(len(n.input) > 3 and n.input[3] for n in nodes)  # asymmetric: zero points given
        got = OrtModel(path, threads=1)(x)
        assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max()), kind
        assert (got.argmax(1) == want.argmax(1)).sum() >= 15, kind
