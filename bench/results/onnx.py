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
           "interleaved between the models (A, B, C, A, ...) in one process, random input (`fixed` and `deploy-u8w` "
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
                "was shared with other jobs)", "",
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
    return out
