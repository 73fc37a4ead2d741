"""Throughput of 1 vs N processes (torchrun, gloo on CPU) for (a) sharded synthesis and (b) data-parallel
QAT steps, on the same total number of cores.

    python bench/ddp_throughput.py                       # writes bench/runs/ddp/ddp_throughput.json
    python bench/ddp_throughput.py --tiny --out /tmp/ddp.json   # a seconds-long check of the script

Each configuration ``PxT`` (P processes of T intra-op threads each; default ``1x1``, ``1xC`` and
``2x(C/2)`` for C cores) runs in fresh processes (``torchrun --standalone`` for P > 1):

* ``synth``: ``zeroq`` on ResNet-20, ``--synth-batches`` batches of ``--synth-batch`` images x
  ``--synth-iters`` iterations (default: the zeroq ``default`` preset, 4 batches of 256 x 120),
  written to a fresh directory: the time of :func:`zsq.distributed.synthesize_sharded` (shards
  gathered on rank 0 included), model loading and start-up excluded;
* ``qat``: the ``qat-kd`` engine (W4A4, ``qat`` protocol, fp32, channels_last, crop + flip) on
  random images, batch ``--qat-batch``; the mean time of ``--qat-steps`` training steps after
  ``--qat-skip`` steps (the EMA warm-up step and a first training step) are left out.

Resumable: the JSON is rewritten after every row; a second run with the same settings only runs the
rows it lacks (``--fresh`` starts over). The load average before and after each row is recorded: a
busy machine makes the numbers worthless for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "runs" / "ddp" / "ddp_throughput.json"
SCHEMA = "zsq-bench-ddp-1"


# -- workers (one process each, launched by the driver) ------------------------------------------------
def _worker(args) -> None:
    import torch

    from zsq.distributed import process_group, world

    torch.set_num_threads(args.threads)
    rank, size = world()
    from zsq.models import load_model

    model = load_model(args.model)
    with process_group() if size > 1 else _null():
        if args.worker == "synth":
            res = _synth(model, args, size)
        else:
            res = _qat(model, args, size)
    if rank == 0:
        Path(args.result).write_text(json.dumps(res))


def _null():
    import contextlib

    return contextlib.nullcontext()


def _barrier(size: int) -> None:
    if size > 1:
        import torch.distributed as dist

        dist.barrier()


def _synth(model, args, size: int) -> dict:
    from zsq.distributed import synthesize_sharded
    from zsq.synth import synthesize

    ov = {"batch_size": args.synth_batch, "iters": args.synth_iters}
    n = args.synth_batch * args.synth_batches
    out = Path(args.result).parent / "set"  # the driver's fresh directory, shared by the ranks
    _barrier(size)
    t0 = time.perf_counter()
    if size > 1:
        s = synthesize_sharded(model, "zeroq", budget="default", seed=0, n_images=n, out_dir=out, progress=False,
                               overrides=ov)
    else:
        s = synthesize(model, "zeroq", budget="default", seed=0, n_images=n, out_dir=out, progress=False, overrides=ov)
    wall = time.perf_counter() - t0
    assert s.n_images == n
    return {"wall_s": round(wall, 3), "images": n, "images_per_s": round(n / wall, 3), "sha256": s.sha256}


def _qat(model, args, size: int) -> dict:
    import torch

    from zsq.qat.engine import QATConfig, qat_finetune
    from zsq.quant.protocol import apply_protocol
    from zsq.record import record_of
    from zsq.spec import PROTOCOLS

    b = args.qat_batch
    images = torch.randn(4 * b, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    student = apply_protocol(model, PROTOCOLS["qat"], 4, 4)
    total = args.qat_skip + args.qat_steps
    cfg = QATConfig(epochs=1, steps_per_epoch=total, batch_size=b, lr=3e-5, ema_epochs=0)
    stamps: list[float] = []
    _barrier(size)
    stamps.append(time.perf_counter())
    q = qat_finetune(student, model, images, cfg, progress=False, ddp=size > 1,
                     callback=lambda e, s, loss: stamps.append(time.perf_counter()))
    per_step = (stamps[-1] - stamps[args.qat_skip]) / args.qat_steps
    return {"s_per_step": round(per_step, 4), "steps": args.qat_steps, "batch": b,
            "images_per_s": round(b / per_step, 3), "ema_steps": cfg.ema_steps,
            "final_loss": record_of(q).methods["qat"]["epochs"][-1]["total"]}


# -- driver ---------------------------------------------------------------------------------------------------
def _configs(spec: str | None) -> list[tuple[int, int]]:
    cores = os.cpu_count() or 1
    if spec is None:
        out = [(1, 1), (1, cores), (2, max(1, cores // 2))]
    else:
        out = [tuple(int(v) for v in c.split("x")) for c in spec.split(",")]
    seen = []
    for c in out:
        if c not in seen:
            seen.append(c)
    return seen


def _run_row(task: str, procs: int, threads: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="zsq-ddp-") as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ZSQ_CACHE": str(Path(tmp) / "cache")}
        worker = [str(Path(__file__).resolve()), "--worker", task, "--threads", str(threads), "--result", str(result),
                  "--model", args.model, "--synth-batch", str(args.synth_batch), "--synth-batches",
                  str(args.synth_batches), "--synth-iters", str(args.synth_iters), "--qat-batch", str(args.qat_batch),
                  "--qat-steps", str(args.qat_steps), "--qat-skip", str(args.qat_skip)]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] \
            if procs > 1 else [sys.executable]
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        p = subprocess.run([*launcher, *worker], env=env, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{task} {procs}x{threads} failed:\n{p.stderr[-4000:]}")
        row = json.loads(result.read_text())
    row.update({"task": task, "procs": procs, "threads_per_proc": threads, "cores_used": procs * threads,
                "process_wall_s": round(time.perf_counter() - t0, 2),
                "loadavg_before": [round(v, 2) for v in load0],
                "loadavg_after": [round(v, 2) for v in os.getloadavg()]})
    return row


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in ("model", "synth_batch", "synth_batches", "synth_iters", "qat_batch",
                                         "qat_steps", "qat_skip")}


def _speedups(rows: list[dict]) -> dict:
    """Per task: each configuration's throughput relative to one process using all the cores (and to
    1x1)."""
    out = {}
    for task in ("synth", "qat"):
        rs = [r for r in rows if r["task"] == task]
        if not rs:
            continue
        cores = max(r["cores_used"] for r in rs)
        base = next((r for r in rs if r["procs"] == 1 and r["cores_used"] == cores), None)
        one = next((r for r in rs if r["procs"] == 1 and r["threads_per_proc"] == 1), None)
        out[task] = {f"{r['procs']}x{r['threads_per_proc']}": {
            "images_per_s": r["images_per_s"],
            "vs_1proc_same_cores": round(r["images_per_s"] / base["images_per_s"], 3) if base else None,
            "vs_1x1": round(r["images_per_s"] / one["images_per_s"], 3) if one else None} for r in rs}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--configs", default=None, help="PxT,... (default 1x1,1xC,2x(C/2) for C cores)")
    ap.add_argument("--tasks", default="synth,qat")
    ap.add_argument("--model", default="cifar10_resnet20")
    ap.add_argument("--synth-batch", type=int, default=256)
    ap.add_argument("--synth-batches", type=int, default=4)
    ap.add_argument("--synth-iters", type=int, default=120)
    ap.add_argument("--qat-batch", type=int, default=256)
    ap.add_argument("--qat-steps", type=int, default=20)
    ap.add_argument("--qat-skip", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="seconds-long settings (checks the script, not the machine)")
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in --out")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("synth", "qat"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if args.tiny:
        args.synth_batch, args.synth_batches, args.synth_iters = 16, 2, 5
        args.qat_batch, args.qat_steps, args.qat_skip = 16, 3, 2
    if args.qat_skip < 2:
        raise SystemExit("--qat-skip must be >= 2 (the EMA warm-up step and the first training step)")
    settings = _settings(args)
    doc = {"schema": SCHEMA, "settings": settings, "rows": []}
    if args.out.is_file() and not args.fresh:
        old = json.loads(args.out.read_text())
        if old.get("schema") == SCHEMA and old.get("settings") == settings:
            doc = old
    from zsq.api import software_versions
    from zsq.hardware import cpu_name
    from zsq.paths import write_json_atomic

    doc["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}
    doc["versions"] = software_versions()
    for task in args.tasks.split(","):
        for procs, threads in _configs(args.configs):
            if any(r["task"] == task and r["procs"] == procs and r["threads_per_proc"] == threads for r in doc["rows"]):
                continue
            row = _run_row(task, procs, threads, args)
            print(f"{task:5s} {procs}x{threads}: {row['images_per_s']:.2f} images/s "
                  f"(load {row['loadavg_before'][0]:.2f} -> {row['loadavg_after'][0]:.2f})", flush=True)
            doc["rows"].append(row)
            doc["speedup"] = _speedups(doc["rows"])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, doc)
    doc["speedup"] = _speedups(doc["rows"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, doc)
    print(json.dumps(doc["speedup"], indent=1))


if __name__ == "__main__":
    main()
