"""What makes a QDQ export run as ONNX Runtime integer kernels, and how many do.

* :func:`fold_static_shapes`: the TorchScript exporter writes shape arithmetic (``Shape -> Gather ->
  Sub -> Div ...``) for every size a module reads from its input at run time, e.g. TensorFlow "SAME"
  padding. With the spatial size fixed and only the batch axis dynamic those values are constants; as
  computed nodes they keep a ``Pad`` between a ``DequantizeLinear`` and its ``Conv`` (ORT then cannot
  fold the padding into the convolution, nor fuse the convolution into ``QLinearConv``). This pass
  evaluates every such node once (ONNX shape inference + the ONNX reference evaluator) and writes
  the results as initializers; the batch axis stays dynamic.
* :func:`quantize_biases`: ORT's Conv / Gemm QDQ selectors want *every* input of the layer to come
  from a ``DequantizeLinear``: a float bias leaves the layer float. The bias becomes int32 codes with
  scale ``s_x * s_w`` (per output channel, zero point 0), the convention of ORT's own quantizer and of
  every integer runtime (the accumulator's scale).
* :func:`integer_ops`: the ops of the model after ORT's optimisation (what its session runs) that are
  integer kernels (``QLinear*``, ``QGemm``, ``ConvInteger``, ``MatMulInteger(ToFloat)``, ``MatMulNBits``...).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

# op types that ONNX Runtime runs on integer data (CPU provider, ORT 1.32)
INT_OP_PREFIXES = ("QLinear",)
INT_OPS = {"QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
           "MatMulNBits", "QAttention", "QEmbedLayerNormalization", "QOrderedMatMul", "DynamicQuantizeLSTM"}


def is_integer_op(op_type: str) -> bool:
    return op_type in INT_OPS or op_type.startswith(INT_OP_PREFIXES)


def fold_static_shapes(m, rounds: int = 64):
    """Replace the shape arithmetic of ``m`` (an ``onnx.ModelProto``) whose value does not depend on
    the dynamic axes by initializers; returns the number of nodes folded (``m`` is changed in place).
    Repeated until nothing changes: a folded ``Pad`` makes the next tensor's shape known."""
    total = 0
    for _ in range(rounds):
        n = _fold_once(m)
        total += n
        if not n:
            break
    return total


def _fold_once(m) -> int:
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = m.graph
    inferred = onnx.shape_inference.infer_shapes(m)
    dims: dict[str, list] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
    const: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    partial: dict[str, list] = {}  # Shape outputs whose dims are only partly known
    folded: dict[str, np.ndarray] = {}
    keep = []
    n_folded = 0
    for n in g.node:
        value = None
        if n.op_type == "Constant" and len(n.output) == 1:
            attr = {a.name: a for a in n.attribute}
            if "value" in attr:
                const[n.output[0]] = numpy_helper.to_array(attr["value"].t)
            keep.append(n)
            continue
        if n.op_type == "Shape" and n.input[0] in dims:
            a = {x.name: x.i for x in n.attribute}
            d = dims[n.input[0]]
            d = d[a.get("start", 0): a["end"] if "end" in a else None]
            if all(v is not None for v in d):
                value = np.array(d, dtype=np.int64)
            else:
                partial[n.output[0]] = d
        elif (n.op_type == "Gather" and n.input[0] in partial and n.input[1] in const
              and not any(x.name == "axis" and x.i != 0 for x in n.attribute)):
            idx = const[n.input[1]]
            picked = np.asarray(partial[n.input[0]], dtype=object)[idx]
            if not any(v is None for v in np.atleast_1d(picked)):
                value = np.asarray(picked, dtype=np.int64)
        elif (n.domain in ("", "ai.onnx") and n.input and all(i in const for i in n.input if i)
              and n.op_type not in ("QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform",
                                    "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")
              and len(n.output) == 1):
            try:
                sub = onnx.helper.make_model(
                    onnx.helper.make_graph([n], "fold", [], [onnx.helper.make_tensor_value_info(n.output[0], 0, None)],
                                           [numpy_helper.from_array(const[i], i) for i in dict.fromkeys(n.input) if i]),
                    opset_imports=list(m.opset_import))
                value = np.asarray(ReferenceEvaluator(sub).run(None, {})[0])
            except Exception:  # an op the reference evaluator cannot run here: leave it
                value = None
            if value is not None and value.size > 4096:  # only small shape arithmetic, never weights
                value = None
        if value is None:
            keep.append(n)
            continue
        const[n.output[0]] = value
        folded[n.output[0]] = value
        n_folded += 1
    if not n_folded:
        return 0
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    del g.node[:]
    g.node.extend(keep)
    for name, v in folded.items():
        if name in used:
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(v), name))
    remove_dead_nodes(m)  # Shape / Constant nodes that only fed folded nodes
    return n_folded


def optimized_ops(model_bytes: bytes, threads: int = 1) -> dict[str, int]:
    """Op type -> count in the graph ONNX Runtime's CPU session runs after its (extended-level)
    optimisations, i.e. after the QDQ fusions, before the hardware-specific NCHWc layout pass."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "opt.onnx"
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(opt)
        so.log_severity_level = 3
        ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        ops: dict[str, int] = {}
        for n in onnx.load(str(opt), load_external_data=False).graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return dict(sorted(ops.items()))


def integer_ops(ops: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in ops.items() if is_integer_op(k)}


def quantize_biases(m) -> int:
    """Store the float bias of every Conv / Gemm whose input and weight are ``DequantizeLinear`` outputs
    as int32 codes + ``DequantizeLinear`` (scale ``s_x * s_w`` per output channel, zero point 0);
    returns how many. ``m`` is changed in place."""
    from onnx import TensorProto, helper, numpy_helper

    g = m.graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1

    def dq_scale(name):
        d = prod.get(name)
        if d is None or d.op_type != "DequantizeLinear" or d.input[1] not in inits:
            return None
        return numpy_helper.to_array(inits[d.input[1]]).astype(np.float64)

    new_nodes, count = [], 0
    for n in g.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in inits:
            if n.op_type == "Gemm":
                attrs = {a.name: a for a in n.attribute}
                if not (attrs.get("transB") and attrs["transB"].i == 1) or (attrs.get("transA") and attrs["transA"].i):
                    new_nodes.append(n)
                    continue
            sx, sw = dq_scale(n.input[0]), dq_scale(n.input[1])
            b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
            if sx is not None and sw is not None and sx.size == 1 and sw.size in (1, b.size):
                scale = (float(sx.reshape(-1)[0]) * np.broadcast_to(sw.reshape(-1), b.shape)).astype(np.float32)
                codes = np.clip(np.round(b / scale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
                base = n.input[2].replace(".", "_").replace("/", "_").replace(":", "_")
                g.initializer.append(numpy_helper.from_array(codes, f"{base}_int32"))
                g.initializer.append(numpy_helper.from_array(scale, f"{base}_bscale"))
                g.initializer.append(helper.make_tensor(f"{base}_bzp", TensorProto.INT32, list(codes.shape),
                                                        [0] * codes.size))
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int32", f"{base}_bscale", f"{base}_bzp"],
                                                  [f"{base}_dq"], name=f"{base}_dq", axis=0))
                old = n.input[2]
                n.input[2] = f"{base}_dq"
                uses[old] -= 1
                if uses[old] == 0:
                    g.initializer.remove(inits.pop(old))
                count += 1
        new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    return count


def fold_pads_into_convs(m) -> int:
    """A zero ``Pad`` (constant pads on the spatial axes only) read by one ``Conv`` alone becomes the
    convolution's own ``pads`` (exact: the convolution pads with the same zeros). ONNX Runtime does not
    fold a ``Pad`` that reads a ``DequantizeLinear`` into the convolution, which then stays float."""
    from onnx import numpy_helper

    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    drop, count = [], 0
    for p in g.node:
        if p.op_type != "Pad" or p.output[0] in graph_outputs:
            continue
        readers = cons.get(p.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Conv" or readers[0].input[0] != p.output[0]:
            continue
        conv = readers[0]
        mode = next((a.s.decode() for a in p.attribute if a.name == "mode"), "constant")
        if mode != "constant" or len(p.input) < 2 or p.input[1] not in inits:
            continue
        if len(p.input) > 2 and p.input[2] and (p.input[2] not in inits or float(np.asarray(inits[p.input[2]]).reshape(-1)[0]) != 0.0):
            continue
        if len(p.input) > 3 and p.input[3]:  # axes input: leave it
            continue
        pads = [int(v) for v in np.asarray(inits[p.input[1]]).reshape(-1)]
        r = len(pads) // 2
        if r < 3 or any(pads[i] for i in (0, 1, r, r + 1)) or any(v < 0 for v in pads):
            continue
        attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        sp = r - 2
        old = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * sp)
        new = [old[i] + pads[2 + i] for i in range(sp)] + [old[sp + i] + pads[r + 2 + i] for i in range(sp)]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        from onnx import helper

        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = p.input[0]
        drop.append(p)
        count += 1
    for p in drop:
        g.node.remove(p)
    remove_dead_nodes(m)
    return count


def remove_dead_nodes(m) -> int:
    """Drop nodes none of whose outputs is read (shape arithmetic left over by the folds)."""
    g = m.graph
    removed = 0
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            for t in [t for t in g.initializer if t.name not in used]:
                g.initializer.remove(t)
            return removed
        for n in dead:
            g.node.remove(n)
        removed += len(dead)
