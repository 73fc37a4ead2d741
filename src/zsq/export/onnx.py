"""ONNX QDQ export of a quantized model, and an ONNX Runtime adapter to evaluate the result.

``export_onnx(qmodel, path)`` writes a standard QDQ model (opset 21) that ONNX Runtime executes:

* every quantized weight is an **integer initializer** (INT8/UINT8 for 5-8 bits, opset-21
  INT4/UINT4 for <= 4 bits, INT16/UINT16 for 16 bits) followed by a per-channel
  ``DequantizeLinear`` with the learned scales and zero-points; the codes are those ``zsq.save``
  writes (read back from the quantizer's own output);
* every activation quantizer becomes ``QuantizeLinear -> DequantizeLinear`` at the same place in the
  graph, with its scale and zero-point; where the quantizer's integer range is narrower than its
  container (3-bit in INT4, 5/6/7-bit in INT8, 2-bit in UINT4 ...), an explicit ``Clip`` to
  ``[(qmin - z) s, (qmax - z) s]`` follows the DequantizeLinear (exactly the grid's end values), so
  the container's wider saturation range cannot widen the grid. The Clip sits *after* DQ on purpose:
  placed before QuantizeLinear, ONNX Runtime 1.32's QDQ optimisations drop it (Clip/Relu + Q fusion
  assumes Q saturates at the grid's ends), which on a W3A3 ResNet-20 changed 45% of the predictions;
  the price is that 5-7-bit activations are not fused into int8 kernels;
* quantizers switched off and layers kept FP stay float.

How: ``torch.onnx.export`` refuses sub-8-bit fake-quant ranges, so the model is traced (the
TorchScript exporter, ``dynamo=False``: the torch.export-based one needs ``onnxscript``, which zsq
does not depend on) with every active quantizer replaced by an identity whose ONNX symbolic is a
custom ``zsq::Mark`` node carrying the quantizer's index; afterwards each mark is rewritten with the
``onnx`` API into the integer initializer + DQ (weights) or [Clip +] Q + DQ (activations). BatchNorm
that the protocol keeps unfolded stays a ``BatchNormalization`` after the convolution (the weight
is a DQ output, so the exporter cannot fold it into quantized weights).

ONNX Runtime fuses ``DQ -> Conv -> [Relu ->] Q`` into ``QLinearConv`` for INT8/UINT8; INT4/UINT4
tensors run (dequantized) but are not fused into integer kernels (ORT 1.32), so a <= 4-bit export is
exact but not faster than float.

Known ONNX Runtime limitation (1.32, measured): its QDQ graph optimisations are only safe when every
quantizer is 8-bit. On a W3A3 ResNet-20 they change 25% of the predictions even with the Clips
after DQ (with ``session.disable_quant_qdq=1``, i.e. the graph as written: 99.6% agreement with
PyTorch). The exported model says which case it is in its metadata (``zsq.qdq_fusion_safe``), and
:class:`OrtModel` (``zsq eval OUT/model.onnx``) turns the QDQ optimisations off when it is ``0``;
other runtimes must do the same for sub-8-bit exports.

Integer kernels (issue 37). Diagnosed on today's W8A8 ``fixed`` EfficientNet-Lite0 export (ORT 1.32,
optimised graph): 7 of 49 convolutions became ``QLinearConv``; the rest ran as float ``Conv`` /
``FusedConv`` fed by a ``DequantizeLinear`` of their int8 weights on every call (130 DQ and 42 Q nodes
left), because (1) ``fixed`` quantizes activations only after activations / blocks, so most convs lack a
quantized input or output, (2) per-tensor scales were written with shape [1] (``np.ascontiguousarray`` of a
0-d array), which ORT's Add / Gemm / pooling selectors refuse, (3) TF "SAME" padding computed from the
input shape at run time left ``Shape -> Gather -> ... -> Pad`` between DQ and Conv, and (4) float biases
keep a Gemm out of ``QGemm``. The ``deploy`` protocol (:mod:`zsq.quant.deploy`) fixes (1); this module
writes 0-d scales, folds the static shape arithmetic and the zero padding into the convolution (exact),
and under ``deploy`` stores biases as int32 with scale ``s_x * s_w`` (:mod:`zsq.export.ortint`). The
exported file records in its metadata how many ops ORT runs as integer kernels after its optimisation
(``zsq.ort_int_ops`` of ``zsq.ort_ops``), and ``zsq export`` adds it to zsq.json (``export.onnx``).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BadValueError, UnsupportedLayerError
from ..paths import atomic_path
from ..quant.modules import QUANT_LAYERS, Quantizer, weight_codes
from ..record import model_info, record_of

OPSET = 21
_DOMAIN = "zsq"
#: how <= 4-bit Linear weights are written: INT4 + DequantizeLinear, or ONNX Runtime's MatMulNBits
INT4_WEIGHTS = ("qdq", "matmulnbits")


class _Mark(torch.autograd.Function):
    """Identity in PyTorch; ``zsq::Mark(idx)`` in the traced ONNX graph."""

    @staticmethod
    def forward(ctx, x, idx: int):  # noqa: D401
        return x.clone()

    @staticmethod
    def symbolic(g, x, idx: int):
        out = g.op(f"{_DOMAIN}::Mark", x, idx_i=int(idx))
        out.setType(x.type())  # same shape and dtype (the convolution symbolic needs the weight's shape)
        return out


def _container(q: Quantizer, min_bits: int = 4):
    """(onnx element type, numpy dtype, lo, hi) of the smallest ONNX integer type (of at least
    ``min_bits``) holding q's grid."""
    from onnx import TensorProto

    signed = q.qmin < 0
    if q.bits <= 4 and min_bits <= 4:
        return (TensorProto.INT4, np.int8, -8, 7) if signed else (TensorProto.UINT4, np.uint8, 0, 15)
    if q.bits <= 8:
        return (TensorProto.INT8, np.int8, -128, 127) if signed else (TensorProto.UINT8, np.uint8, 0, 255)
    return (TensorProto.INT16, np.int16, -32768, 32767) if signed else (TensorProto.UINT16, np.uint16, 0, 65535)


def _int_tensor(name: str, values: np.ndarray, elem_type: int):
    from onnx import TensorProto, helper, numpy_helper

    raw = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
           TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32}
    if elem_type in raw:  # raw bytes: as int32_data varints a negative int8 takes 10 bytes
        return numpy_helper.from_array(np.array(values, dtype=raw[elem_type], order="C"), name)
    if elem_type in (TensorProto.INT4, TensorProto.UINT4):  # raw bytes, two codes per byte (ONNX: low nibble first)
        nib = (np.asarray(values).reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        return helper.make_tensor(name, elem_type, list(values.shape), (nib[0::2] | (nib[1::2] << 4)).tobytes(),
                                  raw=True)
    return helper.make_tensor(name, elem_type, list(values.shape), values.reshape(-1).astype(np.int64).tolist())


def _float_tensor(name: str, values: np.ndarray):
    from onnx import numpy_helper

    # np.array, not np.ascontiguousarray: the latter turns a 0-d scale into shape [1], which ONNX Runtime's
    # QDQ selectors read as per-axis and then fuse no QLinearAdd / QGemm / QLinearGlobalAveragePool
    return numpy_helper.from_array(np.array(values, dtype=np.float32, order="C"), name)


class _Tracer:
    """Swaps every active quantizer's forward for a mark while the model is traced."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.marks: list[tuple[str, Quantizer]] = []
        self._patched: list[nn.Module] = []

    def __enter__(self):
        for name, q in self.model.named_modules():
            if isinstance(q, Quantizer) and q.mode != "off":
                if q.mode != "quant" or not q.initialized:
                    raise BadValueError(f"quantizer {name} has no range: calibrate the model before exporting")
                idx = len(self.marks)
                self.marks.append((name, q))
                q.forward = (lambda x, i=idx: _Mark.apply(x, i))  # instance attribute shadows the method
                self._patched.append(q)
        # the tracer reads state_dict(): hide the quantizers' plain-dict extra state from it
        self._extra = Quantizer.get_extra_state
        Quantizer.get_extra_state = nn.Module.get_extra_state
        return self

    def __exit__(self, *exc):
        Quantizer.get_extra_state = self._extra
        for q in self._patched:
            del q.forward


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[bytes, list[tuple[str, Quantizer]]]:
    with _Tracer(model) as tr, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        f = io.BytesIO()
        torch.onnx.export(model, (example,), f, opset_version=OPSET, dynamo=False, do_constant_folding=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          custom_opsets={_DOMAIN: 1})
        return f.getvalue(), tr.marks


def _weight_owner(model: nn.Module, qname: str) -> nn.Module | None:
    if not qname.endswith("wq"):
        return None
    parent = qname.rpartition(".")[0]
    m = model.get_submodule(parent) if parent else model
    return m if isinstance(m, QUANT_LAYERS) else None


def to_onnx(qmodel: nn.Module, example: torch.Tensor | None = None, int4: bool = True, weights: str = "s8",
            int4_weights: str = "qdq"):
    """The QDQ ``onnx.ModelProto`` of ``qmodel`` (see module doc). ``int4=False`` stores <= 4-bit
    tensors in 8-bit containers (same values; ONNX Runtime then runs them as int8 kernels).
    ``weights="u8"`` stores symmetric signed 5-8-bit weight codes shifted by +128 in UINT8 with zero
    point 128 (the same values): ONNX Runtime then runs u8 x u8 kernels, which on x86 CPUs without VNNI
    (AVX2) cannot saturate, where its u8 x s8 kernels sum pairs of products into int16 with saturation
    (measured on a W8A8 ResNet-20 here: 92% of the PyTorch predictions with s8 weights, 98.8% with u8, as
    with the QDQ graph run in float) at about half the speed.
    ``int4_weights="matmulnbits"`` writes every Linear layer with <= 4-bit weights as ONNX Runtime's
    ``com.microsoft::MatMulNBits`` (its 4-bit kernels; the same weight values, see :mod:`zsq.export.nbits`)
    instead of an INT4 initializer + ``DequantizeLinear`` (``"qdq"``, the default: standard ONNX, run in float)."""
    if weights not in ("s8", "u8"):
        raise BadValueError(f"weights must be s8 or u8, got '{weights}'")
    if int4_weights not in INT4_WEIGHTS:
        raise BadValueError(f"int4 weights must be one of {', '.join(INT4_WEIGHTS)}, got '{int4_weights}'")
    import onnx
    from onnx import TensorProto, helper

    if example is None:
        example = torch.zeros(1, *_input_shape(qmodel))
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            raw, marks = _trace(qmodel, example)
    finally:
        qmodel.train(was_training)
    m = onnx.load_from_string(raw)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_nodes = []
    nbits: dict[str, tuple] = {}  # DequantizeLinear output of a <= 4-bit Linear weight -> its grid (matmulnbits)
    for n in g.node:
        if n.domain != _DOMAIN:
            new_nodes.append(n)
            continue
        idx = next(a.i for a in n.attribute if a.name == "idx")
        qname, q = marks[idx]
        src, dst = n.input[0], n.output[0]
        elem, npt, lo, hi = _container(q, 4 if int4 else 8)
        s = q.scale.detach().float().reshape(-1).numpy()
        z = q.zero_point.detach().float().round().reshape(-1).numpy().astype(np.int64)
        owner = _weight_owner(qmodel, qname)
        base = qname.replace(".", "_")
        axis = int(q.ch_axis) if q.per_channel else None
        if not q.per_channel:
            s, z = s.reshape(()), z.reshape(())
        if owner is not None:
            if src not in inits:
                raise UnsupportedLayerError(f"weight of {qname[:-3]} is not a plain initializer in the trace")
            codes = weight_codes(q, owner.weight.detach()).to(torch.int64).numpy()
            if int4_weights == "matmulnbits" and q.bits <= 4 and isinstance(owner, nn.Linear):
                nbits[dst] = (codes, s, z, q.qmin, q.qmax)
            if weights == "u8" and elem == TensorProto.INT8 and not z.any():
                codes, z, elem = codes + 128, z + 128, TensorProto.UINT8
            g.initializer.append(_int_tensor(f"{base}_int", codes, elem))
            zp_name = f"{base}_zp"
            g.initializer.append(_float_tensor(f"{base}_scale", s))
            g.initializer.append(_int_tensor(zp_name, z, elem))
            kw = {"axis": axis} if axis is not None else {}
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", zp_name], [dst],
                                              name=f"{base}_dq", **kw))
            uses[src] -= 1
            if uses[src] == 0:  # the float weight is no longer needed
                g.initializer.remove(inits.pop(src))
            continue
        g.initializer.append(_float_tensor(f"{base}_scale", s))
        g.initializer.append(_int_tensor(f"{base}_zp", z, elem))
        narrow = (q.qmin, q.qmax) != (lo, hi)
        kw = {"axis": axis} if axis is not None else {}
        new_nodes.append(helper.make_node("QuantizeLinear", [src, f"{base}_scale", f"{base}_zp"], [f"{base}_q"],
                                          name=f"{base}_q", **kw))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"],
                                          [f"{base}_dq" if narrow else dst], name=f"{base}_dq", **kw))
        if narrow:  # grid narrower than its container: clip the dequantized values to the grid's ends
            if axis is not None:
                raise UnsupportedLayerError(f"per-channel activation quantizer {qname} with a narrow grid")
            g.initializer.append(_float_tensor(f"{base}_lo", (np.float32(q.qmin - z) * s).astype(np.float32)))
            g.initializer.append(_float_tensor(f"{base}_hi", (np.float32(q.qmax - z) * s).astype(np.float32)))
            new_nodes.append(helper.make_node("Clip", [f"{base}_dq", f"{base}_lo", f"{base}_hi"], [dst],
                                              name=f"{base}_clip"))
    del g.node[:]
    g.node.extend(new_nodes)
    keep = [o for o in m.opset_import if o.domain != _DOMAIN]
    del m.opset_import[:]
    m.opset_import.extend(keep)
    m.producer_name = "zsq"
    from .ortint import fold_pads_into_convs, fold_static_shapes, quantize_biases

    fold_static_shapes(m)  # exact: shape arithmetic of the fixed spatial size becomes constants
    fold_pads_into_convs(m)  # exact: zero padding into the convolution that reads it
    layout = getattr(record_of(qmodel), "layout", None)
    protocol = getattr(layout, "protocol", None)
    if protocol == "deploy":  # int32 biases: what ORT's Conv / Gemm QDQ fusions need (other presets unchanged)
        quantize_biases(m)
    n_nbits = 0
    if nbits:
        from .nbits import to_matmulnbits

        n_nbits = to_matmulnbits(m, nbits)
    bits = sorted({q.bits for _, q in marks})
    props = {"zsq.bits": ",".join(map(str, bits)), "zsq.qdq_fusion_safe": "1" if set(bits) <= {8} else "0"}
    if int4_weights != "qdq":
        props["zsq.int4_weights"] = f"{int4_weights}:{n_nbits}"
    if protocol:
        props["zsq.protocol"] = str(protocol)
    onnx.helper.set_model_props(m, props)
    onnx.checker.check_model(m)
    return m


def integer_kernel_report(m) -> dict:
    """How ONNX Runtime (CPU provider) runs ``m``: ``{"int_ops": n, "ops": n, "int_op_types": {...}}``
    after its optimisation (see :mod:`zsq.export.ortint`); ``{}`` without onnxruntime."""
    try:
        from .ortint import integer_ops, optimized_ops

        ops = optimized_ops(m.SerializeToString())
    except ImportError:
        return {}
    ints = integer_ops(ops)
    float_layers = sum(v for k, v in ops.items() if k in FLOAT_LAYER_OPS)
    return {"int_ops": sum(ints.values()), "ops": sum(ops.values()), "int_op_types": ints, "float_layers": float_layers}


#: op types after ORT's optimisation that are a Conv / Linear / MatMul still computed in float
FLOAT_LAYER_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "NchwcConv")


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    pre = getattr(model_info(model), "preprocess", None)
    size = int(getattr(pre, "input_size", 32) or 32)
    return (3, size, size)


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example: torch.Tensor | None = None,
                int4: bool = True, weights: str = "s8", int4_weights: str = "qdq") -> Path:
    """Write ``qmodel`` as a QDQ ONNX model to ``path`` (atomically: a temporary name, then rename)."""
    import onnx

    m = to_onnx(qmodel, example, int4=int4, weights=weights, int4_weights=int4_weights)
    rep = integer_kernel_report(m)
    if rep:  # recorded in the file: how many ops ONNX Runtime runs as integer kernels
        onnx.helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props},
                                        "zsq.ort_int_ops": str(rep["int_ops"]), "zsq.ort_ops": str(rep["ops"]),
                                        "zsq.ort_float_layers": str(rep["float_layers"]),
                                        "zsq.ort_int_op_types": ",".join(f"{k}:{v}" for k, v in rep["int_op_types"].items())})
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(m, str(tmp))
    return path


def export_fp_onnx(model: nn.Module, path: str | os.PathLike, example: torch.Tensor | None = None) -> Path:
    """The float model as ONNX (same exporter settings, for latency comparisons)."""
    if example is None:
        example = torch.zeros(1, *_input_shape(model))
    path = Path(path)
    was = model.training
    model.eval()
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), opset_version=OPSET, dynamo=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            import onnx

            from .ortint import fold_pads_into_convs, fold_static_shapes

            m = onnx.load(str(tmp))
            if fold_static_shapes(m) + fold_pads_into_convs(m):  # the same exact folds as the QDQ export
                onnx.save(m, str(tmp))
    finally:
        model.train(was)
    return path


class OrtModel(nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` call (float32 NCHW in, logits out), so
    :func:`zsq.data.eval.evaluate` runs it like a PyTorch model. The model part of its record is
    ``like``'s (the preprocessing of the exported model). ``qdq_fusion``: ONNX Runtime's QDQ
    optimisations on/off; ``"auto"`` follows the model's ``zsq.qdq_fusion_safe`` metadata."""

    eval_label = "onnxruntime"  # named on evaluate()'s progress line

    def __init__(self, path: str | os.PathLike, threads: int | None = None, like: nn.Module | None = None,
                 optimized_path: str | os.PathLike | None = None,
                 level: str = "all", qdq_fusion: bool | str = "auto"):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
        if qdq_fusion == "auto":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            qdq_fusion = props.get("zsq.qdq_fusion_safe", "1") == "1"
        if not qdq_fusion:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        if like is not None and model_info(like) is not None:
            record_of(self).model = model_info(like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def export_summary(path: str | os.PathLike) -> dict:
    """What an exported model says about itself (its metadata): bits, protocol, and how many ops ONNX
    Runtime runs as integer kernels after its optimisation."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    types = {}
    for item in filter(None, props.get("zsq.ort_int_op_types", "").split(",")):
        k, _, v = item.partition(":")
        types[k] = int(v)
    out = {"path": Path(path).name, "bytes": Path(path).stat().st_size, "protocol": props.get("zsq.protocol"),
           "bits": [int(b) for b in props.get("zsq.bits", "").split(",") if b]}
    if "zsq.int4_weights" in props:  # "matmulnbits:<layers written so>"
        kind, _, n = props["zsq.int4_weights"].partition(":")
        out["int4_weights"] = {"kind": kind, "layers": int(n or 0)}
    if "zsq.ort_int_ops" in props:
        out |= {"ort_int_ops": int(props["zsq.ort_int_ops"]), "ort_ops": int(props["zsq.ort_ops"]),
                "ort_int_op_types": types, "ort_float_layers": int(props.get("zsq.ort_float_layers", 0))}
    return out


def integer_kernel_note(summary: dict) -> str | None:
    """One line for ``zsq export`` when the exported model does not run (entirely) as integer kernels."""
    n, total = summary.get("ort_int_ops"), summary.get("ort_ops")
    proto = summary.get("protocol")
    if n is None:
        return None
    nbits = (summary.get("int4_weights") or {}).get("layers", 0)
    if proto != "deploy":
        return (f"note: protocol '{proto}' is not laid out for integer kernels (asymmetric per-channel weights, "
                f"activation quantizers not at every integer op's input and output): ONNX Runtime runs {n} of "
                f"{total} ops as integer kernels"
                + (f" ({nbits} Linear layers as MatMulNBits, its 4-bit weight kernels)" if nbits else "")
                + ", the rest dequantized in float; quantize with --protocol deploy (W8A8) for an integer model")
    if summary.get("ort_float_layers"):
        return (f"note: {summary['ort_float_layers']} Conv/Gemm/MatMul layers stay float in ONNX Runtime "
                f"({','.join(map(str, summary.get('bits', [])))}-bit tensors: its integer kernels take 8-bit "
                "containers, and activations below 8 bits carry a Clip); W8A8 runs as integer kernels")
    return None


def record_export(out: str | os.PathLike, path: str | os.PathLike) -> dict:
    """Add the export's summary to ``OUT/zsq.json`` (key ``export.onnx``, written atomically)."""
    import json

    from ..paths import write_json_atomic

    summary = export_summary(path)
    meta_path = Path(out) / "zsq.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("export", {})["onnx"] = summary
    write_json_atomic(meta_path, meta)
    return summary
