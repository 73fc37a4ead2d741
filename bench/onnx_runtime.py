"""ONNX Runtime benchmark (issue 9): exported QDQ models against the PyTorch fake-quant models.

For ResNet-20 on JPEG-CIFAR-10 (10,000 test images):

* accuracy: ``zeroq`` (``ptq``, default budget, seed 0) at W8A8 and W4A8, exported with
  ``zsq export``; top-1 in PyTorch and in ONNX Runtime (its default optimisation, with QDQ fusion
  where the export's metadata says it is safe);
* latency: FP32 ONNX against the W8A8 QDQ model (int8 kernels) and the W4A8 one, batch 1 and 64,
  ``intra_op_num_threads`` = 2, median of repeated runs after warm-up.

One JSON per model under ``bench/runs/onnx/`` (resumable: an existing file is kept); ``zsq bench
report`` renders them into docs/results.md. Run from the repository root:

    ZSQ_HOME=../shared/assets ZSQ_CACHE=... python bench/onnx_runtime.py [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import zsq
from zsq.export.onnx import OrtModel, export_fp_onnx, export_onnx

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "runs" / "onnx"
TEST = Path(os.environ.get("ZSQ_HOME", ROOT.parent / "shared" / "assets")) / "cifar10-jpeg" / "test.tar"


def latency_ms(model: OrtModel, batch: int, shape, seconds: float = 3.0, warmup: int = 5) -> dict:
    x = torch.randn(batch, *shape)
    for _ in range(warmup):
        model(x)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 10:
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"batch": batch, "median_ms": round(statistics.median(times), 3), "runs": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--force", action="store_true", help="measure again even if the JSON exists")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    fp = zsq.load_model("cifar10_resnet20")
    shape = (3, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [("fp32", None, None)] + [(f"zeroq-W{w}A{a}", w, a) for w, a in [(8, 8), (4, 8)]]
        for name, w, a in rows:
            out_json = RUNS / f"cifar10_resnet20__{name}.json"
            if out_json.exists() and not args.force:
                print(f"{name}: kept {out_json}")
                continue
            rec: dict = {"model": "cifar10_resnet20", "name": name, "threads": args.threads,
                         "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
                         "load_avg": round(os.getloadavg()[0], 2)}
            if w is None:
                path = export_fp_onnx(fp, tmp / "fp32.onnx")
                ref = fp
            else:
                ref = zsq.quantize(fp, "zeroq", w, a, protocol="ptq", budget="default", seed=0, progress=False)
                path = export_onnx(ref, tmp / f"{name}.onnx")
            ort_model = OrtModel(path, threads=args.threads, like=ref)
            props = {}
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
            rec["qdq_fusion"] = props.get("zsq.qdq_fusion_safe", "n/a")
            rec["onnx_bytes"] = path.stat().st_size
            r_t = zsq.evaluate(ref, str(TEST), progress=False)
            r_o = zsq.evaluate(ort_model, str(TEST), progress=False)
            rec["top1_pytorch"], rec["top1_onnxruntime"], rec["n_eval"] = r_t["top1"], r_o["top1"], r_o["n"]
            rec["latency"] = [latency_ms(ort_model, b, shape) for b in (1, 64)]
            opt = tmp / f"{name}.opt.onnx"
            OrtModel(path, threads=args.threads, optimized_path=opt, level="extended")
            ops: dict[str, int] = {}
            for n in onnx.load(str(opt)).graph.node:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
            rec["optimized_ops"] = dict(sorted(ops.items()))
            rec["versions"] = {"zsq": zsq.__version__, "torch": torch.__version__,
                               "onnxruntime": __import__("onnxruntime").__version__, "numpy": np.__version__}
            out_json.write_text(json.dumps(rec, indent=1) + "\n")
            print(name, {k: rec[k] for k in ("top1_pytorch", "top1_onnxruntime")}, rec["latency"])


if __name__ == "__main__":
    main()
