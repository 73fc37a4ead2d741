"""Shared plumbing of the peer scripts (``mct_peer.py``, ``aimet_peer.py``).

Runs inside a peer's own virtual environment (``bench/peers/.venv-<peer>``, made by ``setup.sh``),
where zsq is installed editable: the model, the evaluation images and the top-1 code are zsq's own,
so a peer row differs from a zsq row only in what the peer does between "FP model" and "quantized
model". Deliberately small and free of peer imports.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

DEFAULT_MODEL = "cifar10_resnet20"
DEFAULT_EVAL = "cifar10-jpeg/test.tar"  # relative to ZSQ_HOME, as in zsq.bench.runner.Run


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--w", type=int, required=True, help="weight bits (first conv and last FC stay at 8)")
    p.add_argument("--a", type=int, required=True, help="activation bits (stem output and classifier input stay at 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="result JSON (written atomically)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="zsq zoo name (default %(default)s)")
    p.add_argument("--eval", default=DEFAULT_EVAL, help="eval set, relative to ZSQ_HOME or absolute (default %(default)s)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate on the first N/10 images per class only (quick tests)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    return p


def setup_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (a peer imported torch and started its pool)
        pass


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def asset(p: str) -> str:
    if os.path.isabs(p):
        return p
    home = os.environ.get("ZSQ_HOME")
    if not home:
        sys.exit(f"ZSQ_HOME is not set: cannot resolve the eval set '{p}' (set ZSQ_HOME or pass an absolute --eval)")
    return str(Path(home) / p)


def load_fp_model(name: str):
    """The FP model from zsq's zoo (eval mode, its record's ``model`` set)."""
    from zsq.models import load_model

    return load_model(name)


def evaluate(model, preprocess, eval_path: str, limit: int | None) -> dict:
    """zsq's own top-1 / top-5 code (``zsq.data.eval.evaluate``), rounded like zsq's JSON."""
    from zsq.data.eval import evaluate as zsq_evaluate

    r = zsq_evaluate(model, eval_path, limit=limit, progress=False, preprocess=preprocess)
    return {"top1": round(r["top1"], 2), "top5": round(r["top5"], 2), "n": r["n"]}


class Phases:
    """Wall and CPU seconds (all threads of this process) per named phase."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        self.load_avg = round(os.getloadavg()[0], 2)  # 1-minute load when the run started

    @contextmanager
    def __call__(self, name: str):
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = round(self.wall.get(name, 0.0) + time.perf_counter() - t, 2)
            self.cpu[name] = round(self.cpu.get(name, 0.0) + time.process_time() - c, 2)

    def summary(self) -> tuple[dict, dict]:
        wall, cpu = dict(self.wall), dict(self.cpu)
        wall["total"] = round(time.perf_counter() - self._t0, 2)
        cpu["total"] = round(time.process_time() - self._c0, 2)
        return wall, cpu


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def versions(peer_dist: str) -> dict:
    import importlib.metadata as md

    import torch
    import torchvision
    import zsq

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "zsq": getattr(zsq, "__version__", None)}
    try:
        out[peer_dist] = md.version(peer_dist)
    except md.PackageNotFoundError:
        out[peer_dist] = None
    return out


def write_result(path: str, rec: dict) -> None:
    """Atomic JSON write (tmp + rename), with zsq's own helper."""
    from zsq.paths import write_json_atomic

    write_json_atomic(path, rec)


def base_record(peer: str, args, phases: Phases, metrics: dict, **extra) -> dict:
    wall, cpu = phases.summary()
    # "wall_s_no_eval" follows zsq's definition of wall time (synthesis + quantization, evaluation
    # excluded) so the report can put the two side by side.
    no_eval = round(sum(v for k, v in wall.items() if k not in ("total", "eval", "load")), 2)
    cpu_no_eval = round(sum(v for k, v in cpu.items() if k not in ("total", "eval", "load")), 2)
    return {
        "peer": peer,
        "model": args.model,
        "w": args.w,
        "a": args.a,
        "seed": args.seed,
        "eval_path": asset(args.eval),
        "eval_limit": args.eval_limit,
        "n_eval": metrics.get("n"),
        "top1": metrics.get("top1"),
        "top5": metrics.get("top5"),
        "wall_s": wall,
        "cpu_s": cpu,
        "wall_s_no_eval": no_eval,
        "cpu_s_no_eval": cpu_no_eval,
        "threads": args.threads,
        "peak_rss_mb": peak_rss_mb(),
        "load_avg": phases.load_avg,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **extra,
    }
