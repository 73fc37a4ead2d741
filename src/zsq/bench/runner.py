"""Benchmark runner: the same protocol and budget for every recipe, one JSON per run under
``bench/runs/``, resumable (a finished run is never recomputed), and ``docs/results.md`` generated
from those files (by the checkout's ``bench/report.py``, which ``zsq bench report`` runs).

Each run is a separate ``python -m zsq quantize ...`` process, so wall time and peak memory are
those of that run alone. Synthetic sets are cached in ``ZSQ_CACHE``: the first bit setting of a
(model, recipe, seed) pays the synthesis, later ones reuse it; the JSON records which.

An unfinished run resumes too: its OUT (with the quantizer's checkpoints, ``OUT/.ckpt``) lives in
``ZSQ_CACHE/bench-work/RUN_ID`` until it finishes, and a later ``zsq bench run`` continues it with
``--resume`` (QAT, generator and reconstruction engines checkpoint; the others start over). Its JSON
then records the earlier attempts (``resumed``: their count and wall seconds up to their last
heartbeat, an upper bound of the work they kept). A lock in that directory keeps two ``bench run``
processes off the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, asdict, field
from pathlib import Path

from rich.console import Console

from ..paths import write_json_atomic, zsq_cache

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


class RunBusy(RuntimeError):
    """The run is in progress in another ``zsq bench run`` process (its lock is held)."""


def work_dir(run: Run) -> Path:
    """Where ``run``'s OUT lives until it finishes (kept across invocations, so it can resume)."""
    return zsq_cache() / "bench-work" / run.run_id


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def _take_lock(work: Path) -> None:
    """Own ``work``: refuse (:class:`RunBusy`) while the process that holds its lock, or the quantize
    process it started, is alive; a lock whose processes are gone is taken over."""
    work.mkdir(parents=True, exist_ok=True)
    lock = work / "lock.json"
    try:
        held = json.loads(lock.read_text())
    except (OSError, ValueError):
        held = {}
    if any(_alive(held.get(k)) for k in ("runner", "child")) and held.get("runner") != os.getpid():
        raise RunBusy(f"in progress in process {held.get('runner')} ({work})")
    write_json_atomic(lock, {"runner": os.getpid(), "child": None})


def _has_checkpoint(work: Path) -> bool:
    """Whether ``work``'s OUT holds a checkpoint to resume from."""
    ck = work / "out" / ".ckpt"
    return ck.is_dir() and any(ck.iterdir())


def _earlier_attempts(work: Path) -> list[dict]:
    try:
        return json.loads((work / "attempts.json").read_text())
    except (OSError, ValueError):
        return []


def _attempt(cmd: list[str], env: dict, work: Path, attempts: list[dict], heartbeat_s: float) -> subprocess.CompletedProcess:
    """Run one attempt of ``cmd``, recording its start and a heartbeat in ``work/attempts.json``; Ctrl-C
    or SIGTERM is passed on as SIGINT (the engines then save a checkpoint) and re-raised."""
    me = {"start": time.time(), "last": time.time()}
    attempts = attempts + [me]
    write_json_atomic(work / "attempts.json", attempts)
    with open(work / "stdout.log", "w") as out, open(work / "stderr.log", "w") as err:
        # SIGINT back to its default in the child (a runner started in the background, e.g. `nohup ... &`,
        # ignores it, and the child would inherit that): Python then turns it into KeyboardInterrupt
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        write_json_atomic(work / "lock.json", {"runner": os.getpid(), "child": p.pid})
        old = signal.signal(signal.SIGTERM, signal.default_int_handler) if _main_thread() else None
        try:
            while True:
                try:
                    rc = p.wait(timeout=heartbeat_s)
                    break
                except subprocess.TimeoutExpired:
                    me["last"] = time.time()
                    write_json_atomic(work / "attempts.json", attempts)
        except KeyboardInterrupt:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
            raise
        finally:
            me["last"] = time.time()
            write_json_atomic(work / "attempts.json", attempts)
            if old is not None:
                signal.signal(signal.SIGTERM, old)
    return subprocess.CompletedProcess(cmd, rc, (work / "stdout.log").read_text(), (work / "stderr.log").read_text())


def _main_thread() -> bool:  # signal handlers can only be set there
    return threading.current_thread() is threading.main_thread()


def run_one(run: Run, runs_dir: Path, threads: int = 2, force: bool = False, heartbeat_s: float = 30.0,
            device: str = "auto") -> dict:
    """Run ``run`` in a ``zsq quantize`` process (``--device device`` unless ``auto``, the command's default),
    unless its JSON exists."""
    out_json = runs_dir / f"{run.run_id}.json"
    if out_json.exists() and not force:
        return json.loads(out_json.read_text())
    work = work_dir(run)
    _take_lock(work)
    out = work / "out"
    # progress on: stderr is a file (work/stderr.log), so it comes as plain lines (zsq.progress) to follow a long run
    cmd = [sys.executable, "-m", "zsq", "quantize", run.model, "--recipe", run.recipe, "--protocol", run.protocol,
           "--w", str(run.w), "--a", str(run.a), "--seed", str(run.seed), "--budget", run.budget,
           "--threads", str(threads), "--eval", _asset(run.eval), "-o", str(out), *run.extra]
    if run.eval_limit:
        cmd += ["--eval-limit", str(run.eval_limit)]
    if device != "auto":
        cmd += ["--device", str(device)]
    if run.calib:
        cmd += ["--calib", _asset(run.calib), "--calib-n", str(run.calib_n)]
    load = round(os.getloadavg()[0], 2)
    # passive OpenMP waiting: spinning threads slow torch 5-13x when the 2 cores are shared
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    try:
        earlier = _earlier_attempts(work)
        resume = bool(earlier) and _has_checkpoint(work)
        if not resume:
            earlier = []
            shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        p = _attempt(cmd + ["--overwrite"] + (["--resume"] if resume else []), env, work, earlier, heartbeat_s)
        if p.returncode != 0 and resume:  # e.g. a checkpoint of other settings: start over once
            console.print(f"[yellow]{run.run_id}: resuming failed ({p.stderr.strip()[-200:]}); starting over[/]")
            earlier, resume = [], False
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            p = _attempt(cmd + ["--overwrite"], env, work, [], heartbeat_s)
        total = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{run.run_id} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
        z = json.loads((out / "zsq.json").read_text())
    except BaseException:
        lock = work / "lock.json"
        if lock.exists():
            lock.unlink()
        raise
    rec = {"run": asdict(run), "run_id": run.run_id, "command": " ".join(cmd[2:]).replace(str(out), "OUT"),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "process_wall_s": round(total, 1), "load_avg": load,
           "zsq": z}
    if resume:
        rec["resumed"] = {"attempts": len(earlier),
                          "earlier_wall_s": round(sum(a["last"] - a["start"] for a in earlier), 1)}
    write_json_atomic(out_json, rec)
    shutil.rmtree(work, ignore_errors=True)
    return rec


def run_wall_s(rec: dict) -> float:
    """A run's wall seconds: zsq's own (synthesis + quantization) plus, for a resumed run, its earlier
    attempts' (``resumed.earlier_wall_s``)."""
    return rec["zsq"]["wall_s"] + (rec.get("resumed") or {}).get("earlier_wall_s", 0.0)


def run_suite(runs: list[Run], runs_dir: str | Path = "bench/runs", threads: int = 2, force: bool = False,
              device: str = "auto") -> list[dict]:
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, r in enumerate(runs, 1):
        done = (runs_dir / f"{r.run_id}.json").exists() and not force
        resuming = not done and _has_checkpoint(work_dir(r))
        console.print(f"[{i}/{len(runs)}] {r.run_id}{' (done)' if done else ' (resuming)' if resuming else ''}")
        try:
            rec = run_one(r, runs_dir, threads, force, device=device)
        except RunBusy as e:
            console.print(f"[yellow]    skipped: {e}[/]")
            continue
        except RuntimeError as e:
            console.print(f"[red]{e}[/]")
            continue
        m = rec["zsq"]["metrics"] or {}
        console.print(f"    top1 {m.get('top1')}  wall {rec['zsq']['wall_s']} s"
                      + (f" (+{rec['resumed']['earlier_wall_s']} s earlier attempts)" if rec.get("resumed") else ""))
        out.append(rec)
    return out
