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
