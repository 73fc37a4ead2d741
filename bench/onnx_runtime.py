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

Issue 37 (``--suite deploy``): per model (ResNet-20 on the 10,000 JPEG-CIFAR-10 images, EfficientNet-Lite0
on the 1,000 val256 images), FP32 ONNX, ``squant`` W8A8 under ``deploy`` (s8 weights, and the same model
with u8 weight containers) and under ``fixed``, exported with ``zsq export``, and ONNX Runtime's own
``quantize_static`` of the same FP32 ONNX (QDQ, per-channel s8 weights, u8 activations) calibrated on zsq's
Gaussian-noise images (data-free, like zsq); latency at batch 1 and 32, the calls interleaved between the
models, median of 30, load average logged; top-1 in ONNX Runtime and PyTorch; integer-op counts after ORT's
optimisation. One JSON per model under ``bench/runs/onnx_deploy/``:

    OMP_NUM_THREADS=1 python bench/onnx_runtime.py --suite deploy [--models efficientnet_lite0] [--force]

Issue 37 item 2 (``--suite nbits``): the small ViT (``cifar10_vit_tiny``) with 4-bit weights: FP32, zsq's W4
weights-only model as INT4 QDQ and as ``com.microsoft::MatMulNBits`` (``zsq export --int4-weights matmulnbits``),
the W4A8 model as MatMulNBits, and ONNX Runtime's own ``MatMulNBitsQuantizer`` (which needs the ``onnx-ir``
package: ``pip install onnx-ir``); batch 1 and 32, 1 and 2 threads; one JSON under ``bench/runs/onnx_nbits/``:

    OMP_NUM_THREADS=1 python bench/onnx_runtime.py --suite nbits [--eval-limit N] [--calls 30] [--force]
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


# ------------------------------------------------------------------------------------------------------------
# issue 37: the deploy protocol against FP32 and ONNX Runtime's own quantize_static, per model
DEPLOY_RUNS = ROOT / "bench" / "runs" / "onnx_deploy"
IMAGENET = Path(os.environ.get("ZSQ_HOME", ROOT.parent / "shared" / "assets")) / "imagenet-sample" / "val256.tar"
DEPLOY_MODELS = {"cifar10_resnet20": TEST, "efficientnet_lite0": IMAGENET}
# timed at batch 32 too (the float-dequantizing fixed export and the u8-weight variant at batch 1 only)
LATENCY_BATCHED = ("fp32", "zsq-deploy", "ort-quantize_static")


def _peer_quantize_static(fp_path: Path, out: Path, calib: np.ndarray) -> Path:
    """ONNX Runtime's own post-training quantizer on the same FP32 ONNX: QDQ, per-channel s8 weights, u8
    activations, min-max calibration on ``calib`` (zsq's Gaussian-noise images: data-free like zsq)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return out


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    # no spin-waiting after a call: with the calls interleaved, one session's spinning workers would take the
    # cores of the next session's call
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved_latency(paths: dict[str, Path], shape, batch: int, threads: int, calls: int = 30,
                        batched: tuple | None = LATENCY_BATCHED) -> dict:
    """Median ms per call of each model, the calls interleaved (model A, B, C, then B, C, A, then C, A, B ...:
    the order rotates every round, so that no model always runs right after the same one, e.g. the FP32 model
    that evicts the caches) so that the machine's load falls on all of them alike; 3 warm-up calls each."""
    paths = {k: p for k, p in paths.items() if batch == 1 or batched is None or k in batched}
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"input": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    load0 = os.getloadavg()[0]
    keys = list(sessions)
    for r in range(calls):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            s = sessions[k]
            t0 = time.perf_counter()
            s.run(None, {"input": x})
            times[k].append((time.perf_counter() - t0) * 1000.0)
    return {"batch": batch, "threads": threads, "calls": calls, "order": "rotating",
            "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "median_ms": {k: round(statistics.median(v), 3) for k, v in times.items()}}


def deploy_suite(args) -> None:
    import onnx

    from zsq.export.onnx import export_summary
    from zsq.synth import synthesize

    DEPLOY_RUNS.mkdir(parents=True, exist_ok=True)
    for model_id in args.models:
        out_json = DEPLOY_RUNS / f"{model_id}.json"
        if out_json.exists() and not args.force:
            print(f"{model_id}: kept {out_json}")
            continue
        data = str(DEPLOY_MODELS[model_id])
        fp = zsq.load_model(model_id)
        from zsq.hardware import cpu_name
        from zsq.record import model_info

        size = model_info(fp).preprocess.input_size
        shape = (3, size, size)
        rec: dict = {"model": model_id, "eval": Path(data).name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "machine": cpu_name(), "cores": os.cpu_count(), "recipe": "squant",
                     "budget": "default", "seed": 0, "load_avg_start": round(os.getloadavg()[0], 2), "rows": {}}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            paths = {"fp32": export_fp_onnx(fp, tmp / "fp32.onnx")}
            torch_models = {"fp32": fp}
            for proto in ("deploy", "fixed"):
                t0 = time.time()
                q = zsq.quantize(fp, "squant", 8, 8, protocol=proto, budget="default", seed=0, progress=False)
                rec["rows"][f"zsq-{proto}"] = {"quantize_s": round(time.time() - t0, 1)}
                torch_models[f"zsq-{proto}"] = q
                paths[f"zsq-{proto}"] = export_onnx(q, tmp / f"{proto}.onnx")
            paths["zsq-deploy-u8w"] = export_onnx(torch_models["zsq-deploy"], tmp / "deploy_u8w.onnx", weights="u8")
            torch_models["zsq-deploy-u8w"] = torch_models["zsq-deploy"]
            calib = synthesize(fp, "gaussian", budget="default", seed=0, n_images=64, progress=False).images
            paths["ort-quantize_static"] = _peer_quantize_static(paths["fp32"], tmp / "peer.onnx",
                                                                  calib.float().numpy())
            rec["peer_calibration"] = "zsq gaussian synthesizer, 64 images, seed 0 (data-free); min-max"
            from zsq.export.ortint import integer_ops, optimized_ops

            for name, path in paths.items():
                row = rec["rows"].setdefault(name, {})
                ops = optimized_ops(path.read_bytes())
                row |= {"onnx_bytes": path.stat().st_size, "int_ops": sum(integer_ops(ops).values()),
                        "ops": sum(ops.values()), "int_op_types": integer_ops(ops), "optimized_ops": ops}
                if name.startswith("zsq-"):
                    row["metadata"] = export_summary(path)
            rec["latency"] = [interleaved_latency(paths, shape, b, t, calls=args.calls)
                              for t in args.bench_threads for b in (1, 32)]
            print(model_id, json.dumps(rec["latency"]))
            for name, path in paths.items():
                row = rec["rows"][name]
                r_o = zsq.evaluate(OrtModel(path, threads=args.threads, like=fp, qdq_fusion=True), data, progress=False)
                row |= {"top1_onnxruntime": r_o["top1"], "n_eval": r_o["n"]}
                if name in ("zsq-deploy", "zsq-fixed"):
                    row["top1_pytorch"] = zsq.evaluate(torch_models[name], data, progress=False)["top1"]
                print(model_id, name, {k: row.get(k) for k in ("top1_pytorch", "top1_onnxruntime", "int_ops")})
        rec["load_avg_end"] = round(os.getloadavg()[0], 2)
        rec["versions"] = {"zsq": zsq.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                           "onnxruntime": __import__("onnxruntime").__version__, "numpy": np.__version__}
        out_json.write_text(json.dumps(rec, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------------------
# issue 37 item 2: <= 4-bit weights that ONNX Runtime executes with its own 4-bit kernels (MatMulNBits)
NBITS_RUNS = ROOT / "bench" / "runs" / "onnx_nbits"
NBITS_MODELS = {"cifar10_vit_tiny": TEST}


def _with_accuracy_level(src: Path, dst: Path, level: int) -> Path:
    """A copy of ``src`` whose MatMulNBits nodes compute at ``accuracy_level`` ``level`` (4: int8 activations,
    quantized per block at run time: faster, not exact)."""
    import onnx
    from onnx import helper

    m = onnx.load(str(src))
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            for a in [a for a in n.attribute if a.name == "accuracy_level"]:
                n.attribute.remove(a)
            n.attribute.append(helper.make_attribute("accuracy_level", level))
    onnx.save(m, str(dst))
    return dst


def _peer_matmulnbits(fp_path: Path, out: Path, accuracy_level: int | None = None) -> Path:
    """ONNX Runtime's own weight-only 4-bit quantizer (``MatMulNBitsQuantizer``, round-to-nearest, its defaults:
    block 128 along K, asymmetric, QOperator = MatMulNBits) on the same FP32 ONNX; it quantizes MatMul weights
    (the Linear layers on 3-d inputs), not Gemm (the classifier head stays FP32)."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node

    qz = MatMulNBitsQuantizer(onnx.load(str(fp_path)), accuracy_level=accuracy_level)
    qz.process()
    qz.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def nbits_suite(args) -> None:
    """Per model: FP32 ONNX; zsq W4 weights only (``minmax-noise`` W4A8 under ``vit-ptq``, default budget,
    seed 0, with its activation quantizers switched off: per-channel symmetric min-max 4-bit weights, float
    activations) exported as INT4 + DequantizeLinear (``qdq``, today's export) and as MatMulNBits
    (``--int4-weights matmulnbits``; also at accuracy_level 4); the full W4A8 model as MatMulNBits; ONNX
    Runtime's ``MatMulNBitsQuantizer`` of the FP32 ONNX (also at accuracy_level 4). Latency at batch 1 and 32,
    1 and 2 threads, interleaved calls, median; top-1 in ORT on the whole test set; file sizes."""
    import onnx

    from zsq.export.onnx import export_summary
    from zsq.export.ortint import integer_ops, optimized_ops
    from zsq.hardware import cpu_name
    from zsq.quant.modules import Quantizer
    from zsq.record import model_info

    NBITS_RUNS.mkdir(parents=True, exist_ok=True)
    for model_id in args.models:
        out_json = NBITS_RUNS / f"{model_id}.json"
        if out_json.exists() and not args.force:
            print(f"{model_id}: kept {out_json}")
            continue
        data = str(NBITS_MODELS[model_id])
        fp = zsq.load_model(model_id)
        size = model_info(fp).preprocess.input_size
        shape = (3, size, size)
        rec: dict = {"model": model_id, "eval": Path(data).name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "machine": cpu_name(), "cores": os.cpu_count(), "recipe": "minmax-noise", "protocol": "vit-ptq",
                     "bits": "W4A8 (weights-only rows: activation quantizers off)", "budget": "default", "seed": 0,
                     "load_avg_start": round(os.getloadavg()[0], 2), "eval_limit": args.eval_limit, "rows": {}}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            paths = {"fp32": export_fp_onnx(fp, tmp / "fp32.onnx")}
            t0 = time.time()
            qa = zsq.quantize(fp, "minmax-noise", 4, 8, protocol="vit-ptq", budget="default", seed=0, progress=False)
            rec["quantize_s"] = round(time.time() - t0, 1)
            import copy

            qw = copy.deepcopy(qa)
            for name, q in qw.named_modules():
                if isinstance(q, Quantizer) and not name.endswith("wq"):
                    q.mode = "off"  # weights only
            torch_models = {"fp32": fp, "zsq-w4-qdq": qw, "zsq-w4-matmulnbits": qw, "zsq-w4-matmulnbits-acc4": qw,
                            "zsq-w4a8-qdq": qa, "zsq-w4a8-matmulnbits": qa}
            paths["zsq-w4-qdq"] = export_onnx(qw, tmp / "w4_qdq.onnx")
            paths["zsq-w4-matmulnbits"] = export_onnx(qw, tmp / "w4_nbits.onnx", int4_weights="matmulnbits")
            paths["zsq-w4-matmulnbits-acc4"] = _with_accuracy_level(paths["zsq-w4-matmulnbits"], tmp / "w4_nbits4.onnx", 4)
            paths["zsq-w4a8-qdq"] = export_onnx(qa, tmp / "w4a8_qdq.onnx")
            paths["zsq-w4a8-matmulnbits"] = export_onnx(qa, tmp / "w4a8_nbits.onnx", int4_weights="matmulnbits")
            paths["ort-matmulnbits"] = _peer_matmulnbits(paths["fp32"], tmp / "peer.onnx")
            paths["ort-matmulnbits-acc4"] = _peer_matmulnbits(paths["fp32"], tmp / "peer4.onnx", accuracy_level=4)
            rec["peer"] = ("onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer defaults (4 bits, "
                           "block 128, asymmetric, RTN, QOperator); MatMul weights only (the Gemm head stays FP32)")
            for name, path in paths.items():
                row = rec["rows"].setdefault(name, {})
                ops = optimized_ops(path.read_bytes())
                row |= {"onnx_bytes": path.stat().st_size, "int_ops": sum(integer_ops(ops).values()),
                        "ops": sum(ops.values()), "int_op_types": integer_ops(ops),
                        "float_layers": sum(v for k, v in ops.items() if k in ("MatMul", "Gemm", "FusedMatMul",
                                                                                "FusedGemm", "Conv", "FusedConv"))}
                if name.startswith("zsq-"):
                    row["metadata"] = export_summary(path)
            rec["latency"] = [interleaved_latency(paths, shape, b, t, calls=args.calls, batched=None)
                              for t in args.bench_threads for b in (1, 32)]
            print(model_id, json.dumps(rec["latency"]))
            for name, path in paths.items():
                row = rec["rows"][name]
                r_o = zsq.evaluate(OrtModel(path, threads=args.threads, like=fp), data, limit=args.eval_limit,
                                   progress=False)
                row |= {"top1_onnxruntime": r_o["top1"], "n_eval": r_o["n"]}
                if name in ("zsq-w4-qdq", "zsq-w4a8-qdq"):
                    row["top1_pytorch"] = zsq.evaluate(torch_models[name], data, limit=args.eval_limit,
                                                       progress=False)["top1"]
                print(model_id, name, {k: row.get(k) for k in ("top1_pytorch", "top1_onnxruntime", "onnx_bytes")},
                      flush=True)
            for a, b in (("zsq-w4-matmulnbits", "zsq-w4-qdq"), ("zsq-w4a8-matmulnbits", "zsq-w4a8-qdq")):
                rec["rows"][a]["top1_pytorch"] = rec["rows"][b]["top1_pytorch"]  # the same PyTorch model
        rec["load_avg_end"] = round(os.getloadavg()[0], 2)
        rec["versions"] = {"zsq": zsq.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                           "onnxruntime": __import__("onnxruntime").__version__, "numpy": np.__version__}
        out_json.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    import sys

    if "--suite" in sys.argv and "nbits" in sys.argv:  # python bench/onnx_runtime.py --suite nbits [--force]
        ap = argparse.ArgumentParser()
        ap.add_argument("--suite", choices=["nbits"], required=True)
        ap.add_argument("--models", nargs="+", default=list(NBITS_MODELS), choices=list(NBITS_MODELS))
        ap.add_argument("--eval-limit", type=int, default=None, help="top-1 on the first N/10 images of every "
                        "class (a reduced set, said so in the results); default: all")
        ap.add_argument("--threads", type=int, default=2, help="threads of the accuracy runs")
        ap.add_argument("--bench-threads", type=int, nargs="+", default=[1, 2], help="intra-op threads timed")
        ap.add_argument("--calls", type=int, default=30, help="timed calls per model (median)")
        ap.add_argument("--force", action="store_true")
        a = ap.parse_args()
        torch.set_num_threads(a.threads)
        nbits_suite(a)
        sys.exit(0)

    if "--suite" in sys.argv:  # python bench/onnx_runtime.py --suite deploy [--models ...] [--force]
        ap = argparse.ArgumentParser()
        ap.add_argument("--suite", choices=["deploy"], required=True)
        ap.add_argument("--models", nargs="+", default=list(DEPLOY_MODELS), choices=list(DEPLOY_MODELS))
        ap.add_argument("--threads", type=int, default=2, help="threads of the accuracy runs")
        ap.add_argument("--bench-threads", type=int, nargs="+", default=[2], help="intra-op threads timed")
        ap.add_argument("--calls", type=int, default=30, help="timed calls per model (median)")
        ap.add_argument("--force", action="store_true")
        a = ap.parse_args()
        torch.set_num_threads(a.threads)
        deploy_suite(a)
    else:
        main()
