"""Benchmark runner: the same protocol and budget for every recipe, one JSON per run under
``bench/runs/``, resumable (a finished run is never recomputed), and ``docs/results.md`` generated
from those files.

Each run is a separate ``python -m zsq quantize ...`` process, so wall time and peak memory are
those of that run alone. Synthetic sets are cached in ``ZSQ_CACHE``: the first bit setting of a
(model, recipe, seed) pays the synthesis, later ones reuse it; the JSON records which.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, asdict, field
from pathlib import Path

from rich.console import Console

from ..paths import write_json_atomic

console = Console(stderr=True)


@dataclass(frozen=True)
class Run:
    model: str
    recipe: str
    protocol: str
    w: int
    a: int
    seed: int = 0
    budget: str = "default"
    eval: str = "cifar10-jpeg/test.tar"  # relative to ZSQ_HOME (or absolute)
    eval_limit: int | None = None
    calib: str | None = None  # real-data baseline: images from this path (relative to ZSQ_HOME)
    calib_n: int = 256
    extra: tuple[str, ...] = ()  # further CLI flags, e.g. ("--synth", "zeroq")

    @property
    def label(self) -> str:
        return f"calib-real-{self.recipe}" if self.calib else self.recipe

    @property
    def run_id(self) -> str:
        core = f"{self.model}__{self.label}__{self.protocol}__W{self.w}A{self.a}__{self.budget}__s{self.seed}"
        tail = "__".join(filter(None, [f"n{self.eval_limit}" if self.eval_limit else "",
                                       hashlib.sha1(" ".join(self.extra).encode()).hexdigest()[:6]
                                       if self.extra else ""]))
        return core + (f"__{tail}" if tail else "")


def _asset(p: str) -> str:
    if os.path.isabs(p):
        return p
    home = os.environ.get("ZSQ_HOME")
    return str(Path(home) / p) if home else p


def run_one(run: Run, runs_dir: Path, threads: int = 2, force: bool = False) -> dict:
    out_json = runs_dir / f"{run.run_id}.json"
    if out_json.exists() and not force:
        return json.loads(out_json.read_text())
    tmp = Path(tempfile.mkdtemp(prefix="zsq-bench-"))
    cmd = [sys.executable, "-m", "zsq", "quantize", run.model, "--recipe", run.recipe, "--protocol", run.protocol,
           "--w", str(run.w), "--a", str(run.a), "--seed", str(run.seed), "--budget", run.budget,
           "--threads", str(threads), "--eval", _asset(run.eval), "-o", str(tmp / "out"), "--quiet", *run.extra]
    if run.eval_limit:
        cmd += ["--eval-limit", str(run.eval_limit)]
    if run.calib:
        cmd += ["--calib", _asset(run.calib), "--calib-n", str(run.calib_n)]
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    # passive OpenMP waiting: spinning threads slow torch 5-13x when the 2 cores are shared
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    total = time.perf_counter() - t0
    try:
        if p.returncode != 0:
            raise RuntimeError(f"{run.run_id} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
        z = json.loads((tmp / "out" / "zsq.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec = {"run": asdict(run), "run_id": run.run_id, "command": " ".join(cmd[2:]).replace(str(tmp / "out"), "OUT"),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "process_wall_s": round(total, 1), "load_avg": load,
           "zsq": z}
    write_json_atomic(out_json, rec)
    return rec


def run_suite(runs: list[Run], runs_dir: str | Path = "bench/runs", threads: int = 2, force: bool = False) -> list[dict]:
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, r in enumerate(runs, 1):
        done = (runs_dir / f"{r.run_id}.json").exists() and not force
        console.print(f"[{i}/{len(runs)}] {r.run_id}{' (done)' if done else ''}")
        try:
            rec = run_one(r, runs_dir, threads, force)
        except RuntimeError as e:
            console.print(f"[red]{e}[/]")
            continue
        m = rec["zsq"]["metrics"] or {}
        console.print(f"    top1 {m.get('top1')}  wall {rec['zsq']['wall_s']} s")
        out.append(rec)
    return out
