"""``bench/onnx_runtime.py``: exported QDQ models in ONNX Runtime (accuracy against PyTorch, latency)."""

from __future__ import annotations

from pathlib import Path

from .common import load_runs


def onnx_section(d: Path) -> list[str]:
    """ONNX Runtime rows written by ``bench/onnx_runtime.py`` (accuracy against PyTorch, latency)."""
    recs = load_runs(d)
    if not recs:
        return []
    out = ["## ONNX Runtime (exported QDQ models, `bench/onnx_runtime.py`)", "",
           "ResNet-20, `zeroq` (`ptq`, default budget, seed 0) exported with `zsq export`; top-1 on the "
           "10,000 JPEG-CIFAR-10 test images in PyTorch (fake-quant) and ONNX Runtime (CPU provider, "
           "default optimisation; QDQ fusion only where the export marks it safe, i.e. all-8-bit). "
           "Latency: median ms per call, intra-op threads as listed, random input.", "",
           "| model | QDQ fusion | top-1 PyTorch | top-1 ORT | batch 1 ms | batch 64 ms | threads | int8 ops after ORT optimisation | load |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        lat = {x["batch"]: x["median_ms"] for x in r.get("latency", [])}
        ops = r.get("optimized_ops", {})
        int_ops = ", ".join(f"{k} {v}" for k, v in ops.items() if k.startswith("QLinear") or k.startswith("QGemm")
                            or k in ("MatMulInteger", "ConvInteger")) or "—"
        out.append(f"| {r['name']} | {r.get('qdq_fusion')} | {r.get('top1_pytorch')} | {r.get('top1_onnxruntime')} | "
                   f"{lat.get(1, '—')} | {lat.get(64, '—')} | {r.get('threads')} | {int_ops} | {r.get('load_avg')} |")
    return out + [""]


def onnx_deploy_section(d: Path) -> list[str]:
    """``bench/onnx_runtime.py --suite deploy`` (issue 37): zsq's ``deploy`` export against FP32 and ONNX
    Runtime's own ``quantize_static``, one table per model."""
    recs = load_runs(d)
    if not recs:
        return []
    out = ["## Integer ONNX exports: `deploy` against FP32 and ONNX Runtime's `quantize_static` "
           "(`bench/onnx_runtime.py --suite deploy`)", "",
           "`squant` W8A8 (default budget, seed 0; synthesis-free) under `deploy` and `fixed`, exported with "
           "`zsq export` (`deploy-u8w`: the same deploy model with `--int8-weights u8`); the peer is ONNX Runtime's "
           "`quantize_static` of the same FP32 ONNX (QDQ, per-channel s8 weights, u8 activations, min-max) calibrated "
           "on 64 of zsq's Gaussian-noise images (data-free, like zsq). ONNX Runtime CPU provider, default "
           "optimisation, no spin-waiting (`session.intra_op.allow_spinning=0`); latency = median ms of the calls, "
           "interleaved between the models (A, B, C, A, ...; runs marked *rotating* start each round with the next "
           "model, so that no model always follows the same one) in one process, random input (`fixed` and `deploy-u8w` "
           "timed at batch 1 only); integer ops = ops ORT runs as integer kernels after its (extended) optimisation, "
           "of all ops. Top-1: ResNet-20 on the 10,000 JPEG-CIFAR-10 test images, Lite0 on the 1,000 val256 images. "
           "Speed-up = FP32 ms / model ms in the same run. The `.onnx bytes` of `zsq-deploy` in the runs of "
           "2026-12-07 predate raw-byte int8 initializers (the export wrote s8 weights as int32 varints, 10 bytes per "
           "negative code); the same ResNet-20 export is now 320,835 bytes.", ""]
    for r in recs:
        lat = r.get("latency", [])
        cols = [(x["batch"], x["threads"]) for x in lat]
        out += [f"**{r['model']}** ({r.get('eval')}; {r.get('date')}, {r.get('machine')}, {r.get('cores')} cores, "
                f"load average {r.get('load_avg_start')} at the start, {r.get('load_avg_end')} at the end: the machine "
                "was shared with other jobs"
                + ("; calls in rotating order" if lat and all(x.get("order") == "rotating" for x in lat) else "")
                + ")", "",
                "| model | top-1 ORT | top-1 PyTorch | integer ops / ops | .onnx bytes | "
                + " | ".join(f"batch {b}, {t} thr ms (speed-up)" for b, t in cols) + " |",
                "|---" * (5 + len(cols)) + "|"]
        for name, row in r["rows"].items():
            cells = []
            for x in lat:
                ms, fp = x["median_ms"].get(name), x["median_ms"].get("fp32")
                cells.append(f"{ms:.2f} ({fp / ms:.2f}x)" if ms and fp else "—")
            out.append(f"| {name} | {row.get('top1_onnxruntime', '—')} | {row.get('top1_pytorch', '—')} | "
                       f"{row.get('int_ops')} / {row.get('ops')} | {row.get('onnx_bytes'):,} | " + " | ".join(cells) + " |")
        loads = "; ".join(f"batch {x['batch']}, {x['threads']} thr: {x['load_avg'][0]} -> {x['load_avg'][1]}" for x in lat)
        out += ["", f"Load average during the timed calls: {loads}.", ""]
        out += _overload_note(r, lat)
        a, b = r["rows"].get("zsq-deploy", {}).get("optimized_ops"), r["rows"].get("ort-quantize_static", {}).get("optimized_ops")
        if a and b:  # the graphs ORT runs (extended optimisation), op by op
            diff = {k: (a.get(k, 0), b.get(k, 0)) for k in sorted(set(a) | set(b)) if a.get(k, 0) != b.get(k, 0)}
            same = ", ".join(f"{k} {v}" for k, v in a.items() if b.get(k) == v)
            out += ["After ORT's optimisation zsq-deploy and ort-quantize_static run the same ops (" + same + ")"
                    + ("; they differ only in " + ", ".join(f"{k} ({x} against {y})" for k, (x, y) in diff.items())
                       if diff else "") + ".", ""]
    return out


def onnx_nbits_section(d: Path) -> list[str]:
    """``bench/onnx_runtime.py --suite nbits`` (issue 37 item 2): <= 4-bit Linear weights as ONNX Runtime's
    MatMulNBits (``zsq export --int4-weights matmulnbits``) against FP32, today's INT4 QDQ export and ORT's own
    ``MatMulNBitsQuantizer``."""
    recs = load_runs(d)
    if not recs:
        return []
    out = ["## 4-bit weights in ONNX Runtime's own kernels: MatMulNBits (`bench/onnx_runtime.py --suite nbits`)", "",
           "Weights-only 4-bit ViT: `minmax-noise` W4A8 under `vit-ptq` (default budget, seed 0) with its activation "
           "quantizers switched off, i.e. per-channel symmetric min-max 4-bit weights on every Conv/Linear (patch "
           "embedding and head included) and float activations; exported with `zsq export` as INT4 + "
           "DequantizeLinear (`zsq-w4-qdq`, the standard export: with float activations and its QDQ optimisations on, "
           "ORT 1.32 itself rewrites the 24 `DequantizeLinear -> MatMul` into MatMulNBits, not the classifier's Gemm; "
           "it does not where the MatMul's input is a DequantizeLinear too, i.e. in a W4A8 model, nor with "
           "`session.disable_quant_qdq`, which `zsq eval` sets for sub-8-bit exports) and "
           "with `--int4-weights matmulnbits` (`zsq-w4-matmulnbits`: the 25 Linear layers as `com.microsoft` "
           "MatMulNBits with the same weight values, computed in float32; `-acc4`: the same file at MatMulNBits' "
           "`accuracy_level` 4, which quantizes the activations to int8 per block at run time: not the PyTorch "
           "model); `zsq-w4a8-qdq` / `zsq-w4a8-matmulnbits`: the full W4A8 model (activation Q/DQ kept) exported both "
           "ways. "
           "Peer: ONNX Runtime's `MatMulNBitsQuantizer` (round-to-nearest, its defaults: 4 bits, block 128 along K, "
           "asymmetric) of the same FP32 ONNX; it quantizes the MatMul layers, not the classifier (a Gemm), so its "
           "head stays FP32. ORT CPU provider, default optimisation, no spin-waiting; latency = median ms of the "
           "interleaved calls, random input; top-1 in ORT on the 10,000 JPEG-CIFAR-10 test images (PyTorch where "
           "listed); integer ops = MatMulNBits / QLinear* after ORT's optimisation. Top-1 in ORT is measured with "
           "`zsq eval`'s session (QDQ optimisations off for sub-8-bit exports), latency with ORT's defaults.", ""]
    for r in recs:
        lat = r.get("latency", [])
        cols = [(x["batch"], x["threads"]) for x in lat]
        order = "rotating order" if all(x.get("order") == "rotating" for x in lat) else "fixed order (A, B, C, A, ...)"
        out += [f"**{r['model']}** ({r.get('eval')}; {r.get('date')}, {r.get('machine')}, {r.get('cores')} cores, "
                f"load average {r.get('load_avg_start')} at the start, {r.get('load_avg_end')} at the end: the machine "
                f"was shared with other jobs; calls in {order}"
                + (f"; **top-1 on a reduced set**: the first {r['eval_limit'] // 10} images of every class "
                   f"({r['eval_limit']} of 10,000), for lack of time on the loaded machine" if r.get("eval_limit") else "")
                + ")", "",
                "| model | top-1 ORT | top-1 PyTorch | integer ops / ops | float MatMul/Gemm/Conv left | .onnx bytes | "
                + " | ".join(f"batch {b}, {t} thr ms (vs FP32)" for b, t in cols) + " |",
                "|---" * (6 + len(cols)) + "|"]
        for name, row in r["rows"].items():
            cells = []
            for x in lat:
                ms, fp = x["median_ms"].get(name), x["median_ms"].get("fp32")
                cells.append(f"{ms:.1f} ({fp / ms:.2f}x)" if ms and fp else "—")
            out.append(f"| {name} | {row.get('top1_onnxruntime', '—')} | {row.get('top1_pytorch', '—')} | "
                       f"{row.get('int_ops')} / {row.get('ops')} | {row.get('float_layers', '—')} | "
                       f"{row.get('onnx_bytes'):,} | " + " | ".join(cells) + " |")
        loads = "; ".join(f"batch {x['batch']}, {x['threads']} thr: {x['load_avg'][0]} -> {x['load_avg'][1]}" for x in lat)
        out += ["", f"Load average during the timed calls: {loads}.", ""]
        out += _overload_note(r, lat)
    return out


def _overload_note(r: dict, lat: list) -> list[str]:
    """A warning where the load average exceeded the core count while the calls were timed."""
    cores = r.get("cores") or 0
    peak = max((max(x["load_avg"]) for x in lat), default=0)
    if not cores or peak <= cores:
        return []
    return [f"**Caution**: the load average ({peak}) exceeded the {cores} cores while these calls were timed: a call "
            "waits for a core a share of the time that grows with its length, so the medians (and the ratios, "
            "most for the longer models) measure the scheduler as much as the model; compare only with a quiet "
            "re-run.", ""]
