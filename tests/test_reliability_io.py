"""Reliability of what zsq writes, on real file systems and with real processes (issue 34 items 1-2,
issue 33 item 5):

* an output that cannot be written (a read-only mount, a full or too small file system) is one line
  with exit 2, found before the long work, and nothing that looks complete (or half-written) is left;
* processes sharing ``ZSQ_CACHE`` make each synthetic batch once: the others wait (one line) and reuse
  it, ``torchrun``-style ranks with disjoint batches do not wait for each other, and a killed lock
  holder's batch is taken over;
* Ctrl-C in the middle of a synthetic batch, then ``--resume``, continues that batch where it stopped
  (and skips the finished ones) and gives the same images as an uninterrupted run.

Read-only and tiny file systems are real mounts (``mount -t tmpfs``, a read-only bind mount) where
the test runs as root and may mount; without root a read-only directory is ``chmod 0555`` (which does
stop a non-root writer); tests that need a mount are skipped with the reason where it is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# -------------------------------------------------------------------------------------------------
# helpers: the real CLI, real mounts

def _env(cache: Path, **extra) -> dict:
    return {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "COLUMNS": "80", "ZSQ_CACHE": str(cache),
            **{k: str(v) for k, v in extra.items()}}


def run_zsq(*args, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zsq", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one non-empty stderr line ``error: ...`` holding ``needles``."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _mount(target: Path, *args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs a mount, which needs root (running as uid {os.geteuid()})")
    r = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"this machine refuses `mount {' '.join(args)}`: {(r.stderr or r.stdout).strip()}")


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def tmpfs(target: Path, options: str):
    target.mkdir(parents=True, exist_ok=True)
    _mount(target, "-t", "tmpfs", "-o", options, "tmpfs")
    try:
        yield target
    finally:
        _umount(target)


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` (a directory with content) read-only in place: a read-only bind mount as root, else
    ``chmod 0555`` (which stops a non-root writer)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield path
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    _mount(path, "--bind", str(path))
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"this machine refuses a read-only bind mount: {(r.stderr or r.stdout).strip()}")
        yield path
    finally:
        _umount(path)


@pytest.fixture
def readonly_dir(tmp_path):
    """An empty directory nobody can write: a read-only tmpfs as root, else mode 0555."""
    d = tmp_path / "ro"
    if os.geteuid() != 0:
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    with tmpfs(d, "ro,size=1m"):
        yield d


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 64 KiB file system (tmpfs)."""
    with tmpfs(tmp_path / "tiny", "size=64k") as d:
        yield d


def _fill(d: Path) -> Path:
    """Fill the file system of ``d`` to the last byte; returns the filler file."""
    f = d / "filler"
    with open(f, "wb", buffering=0) as fh:  # unbuffered: tmpfs allocates whole pages
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return f


def _leftovers(d: Path) -> list[str]:
    """Files that look complete or half-written: results, shards, temporaries."""
    if not d.exists():
        return []
    names = ("zsq.json", "qmodel.pt", "model.onnx", "meta.json")
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")
                  if p.name in names or p.name.endswith(".tmp") or p.name.startswith("shard_"))


# quick settings: zeroq pixels in fp32, 2 iterations (synthesis would run before any write today)
FAST_ZEROQ = ["--recipe", "zeroq", "--budget", "smoke", "--synth-set", "iters=2", "--synth-set", "precision=fp32",
              "--synth-set", "channels_last=false", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def squant_result(tmp_path_factory):
    """A finished result (squant, smoke) and the quantized model, made in this process."""
    import zsq

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q = zsq.quantize("cifar10_resnet20", "squant", 4, 4, budget="smoke", progress=False)
    finally:
        torch.set_num_threads(n)
    out = tmp_path_factory.mktemp("squant") / "out"
    zsq.save(q, out)
    return out, q


# -------------------------------------------------------------------------------------------------
# issue 34 item 1: outputs that cannot be written

def test_read_only_out_is_one_line_before_any_work(readonly_dir, tmp_path):
    cache = tmp_path / "cache"
    out = readonly_dir / "out"
    r = run_zsq("quantize", "cifar10_resnet20", *FAST_ZEROQ, "-o", out, env=_env(cache))
    assert_one_line_error(r, "cannot write", str(readonly_dir))
    # refused before the long part: nothing was synthesized, nothing written anywhere
    assert not list((cache / "synthetic").glob("*/shard_*")), "synthesis ran before the output was checked"
    assert not out.exists() and not list(readonly_dir.iterdir())


def test_read_only_cache_is_one_line_before_any_work(readonly_dir, tmp_path):
    env = _env(readonly_dir / "cache")
    r = run_zsq("synthesize", "cifar10_resnet20", *FAST_ZEROQ, env=env)
    assert_one_line_error(r, "cannot write", str(readonly_dir))
    out = tmp_path / "out"  # a writable OUT does not help: the synthetic set goes to ZSQ_CACHE
    r = run_zsq("quantize", "cifar10_resnet20", *FAST_ZEROQ, "-o", out, env=env)
    assert_one_line_error(r, "cannot write", str(readonly_dir))
    assert _leftovers(out) == []


def test_export_report_overwrite_on_a_read_only_result(squant_result, tmp_path):
    import shutil

    src, _ = squant_result
    res = tmp_path / "res"
    shutil.copytree(src, res)
    before = {p.name: p.read_bytes() for p in res.iterdir()}
    env = _env(tmp_path / "cache")
    with read_only(res):
        assert_one_line_error(run_zsq("export", res, "-q", env=env), "cannot write", str(res))
        assert_one_line_error(run_zsq("report", res, env=env), "cannot write", str(res))
        r = run_zsq("quantize", "cifar10_resnet20", "--recipe", "squant", "--budget", "smoke", "--threads", "1",
                    "-q", "--overwrite", "-o", res, env=env)
        assert_one_line_error(r, "cannot write", str(res))
    # the old result is intact (its zsq.json was not retired) and nothing was added
    assert {p.name: p.read_bytes() for p in res.iterdir()} == before


def test_full_and_too_small_file_systems_are_one_line_before_any_work(tiny_fs, tmp_path):
    env = _env(tmp_path / "cache")
    args = ["quantize", "cifar10_resnet20", *FAST_ZEROQ]
    # too small for qmodel.pt (ResNet-20's parameters alone are ~1 MiB): refused up front
    r = run_zsq(*args, "-o", tiny_fs / "out", env=env)
    assert_one_line_error(r, "cannot write", "free")
    assert not list((tmp_path / "cache" / "synthetic").glob("*/shard_*")), "synthesis ran before the check"
    # a full file system: the probe write fails with ENOSPC
    _fill(tiny_fs)
    r = run_zsq(*args, "-o", tiny_fs / "out2", env=env)
    assert_one_line_error(r, "cannot write", "no space left")
    # a synthetic set that does not fit (ZSQ_CACHE on the full file system)
    r = run_zsq("synthesize", "cifar10_resnet20", *FAST_ZEROQ, env=_env(tiny_fs / "cache"))
    assert_one_line_error(r, "cannot write")
    assert _leftovers(tiny_fs) == []


def test_writes_that_fail_midway_are_output_errors_and_leave_nothing(squant_result, tiny_fs, readonly_dir):
    """The writers themselves (past the up-front checks, e.g. a disk that fills during the run) on real file
    systems: torch.save's zip writer, the checksummed checkpoints, shards, JSON, the ONNX export."""
    import zsq
    from zsq.data.shards import write_shard
    from zsq.errors import OutputError
    from zsq.export.onnx import export_onnx
    from zsq.paths import torch_save_checked, write_json_atomic

    _, q = squant_result
    out = tiny_fs / "out"
    with pytest.raises(OutputError, match="no space left"):
        zsq.save(q, out)  # qmodel.pt does not fit: torch's "unexpected pos" RuntimeError today
    big = {"images": torch.zeros(64, 3, 32, 32)}
    with pytest.raises(OutputError, match="no space left"):
        write_shard(tiny_fs / "syn" / "shard_00000.pt", big)
    with pytest.raises(OutputError, match="no space left"):
        torch_save_checked(big, tiny_fs / ".ckpt" / "recon.pt")
    with pytest.raises(OutputError, match="cannot write"):
        export_onnx(q, tiny_fs / "model.onnx")
    assert _leftovers(tiny_fs) == [], "a half-written file is left"
    for write in (lambda: write_json_atomic(readonly_dir / "zsq.json", {"a": 1}),
                  lambda: zsq.save(q, readonly_dir / "out")):
        with pytest.raises(OutputError, match="cannot write"):
            write()
    assert list(readonly_dir.iterdir()) == []


def test_synthesize_refuses_a_directory_too_small_before_the_first_batch(tiny_fs):
    from zsq.errors import OutputError
    from zsq.models import load_model
    from zsq.synth import synthesize

    made = []
    with pytest.raises(OutputError, match="needs at least"):
        synthesize(load_model("cifar10_resnet20"), "gaussian", budget="smoke", n_images=64, out_dir=tiny_fs / "syn",
                   progress=False, on_shard=lambda k, p: made.append(k))
    assert made == [] and _leftovers(tiny_fs) == []


# -------------------------------------------------------------------------------------------------
# issue 34 item 2: processes sharing ZSQ_CACHE make each batch once

# a synthesizer whose batch k logs "start k PID" and then waits for the file GO (so the test decides
# when a batch ends); its images come from the batch's generator only (equal whoever makes them)
DRIVER = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from zsq.synth.base import Synthesizer, synthesize

    log, go, batches = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    class Blocking(Synthesizer):
        name = "blocking-test"

        def make_batch(self, model, batch_index, generator, *, batch_size, image_shape, step=None):
            with open(log, "a") as f:
                f.write(f"start {batch_index} {os.getpid()}\\n")
            while not go.exists():
                time.sleep(0.02)
            return torch.randn(batch_size, *image_shape, generator=generator)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    synth = Blocking(Blocking.Config.for_budget("smoke", n_images=4, batch_size=2))
    s = synthesize(model, synth, budget="smoke", image_size=8, progress=False,
                   batches=None if batches == "all" else [int(b) for b in batches.split(",")])
    print("complete" if s.complete else "partial", s.sha256, s.n_images, s.dir)
''')


def _starts(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [(int(k), int(pid)) for _, k, pid in (ln.split() for ln in log.read_text().splitlines() if ln)]


def _wait_for(cond, what: str, procs, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a process ended while waiting for {what}: {p.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _start_driver(tmp_path: Path, batches: str, tag: str) -> subprocess.Popen:
    drv = tmp_path / "driver.py"
    if not drv.exists():
        drv.write_text(DRIVER)
    err = open(tmp_path / f"{tag}.err", "w+")
    return subprocess.Popen([sys.executable, str(drv), str(tmp_path / "starts.log"), str(tmp_path / "GO"), batches],
                            stdout=subprocess.PIPE, stderr=err, text=True, env=_env(tmp_path / "cache"), cwd=REPO)


def _err(tmp_path: Path, tag: str) -> str:
    return (tmp_path / f"{tag}.err").read_text()


@contextlib.contextmanager
def _drivers(tmp_path: Path):
    """``start(batches, tag)`` starts a driver and lists it in ``procs`` (the processes still to watch);
    every driver still running at the end is killed."""
    procs: list[subprocess.Popen] = []

    def start(batches: str, tag: str) -> subprocess.Popen:
        procs.append(_start_driver(tmp_path, batches, tag))
        return procs[-1]

    try:
        yield start, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


WAITING = "being made by another process"


def test_shared_cache_each_batch_made_once_ranks_do_not_wait(tmp_path):
    """A (the whole set) makes batch 0; B (a rank with batch 1 only) makes batch 1 at the same time,
    without waiting for A; C (the whole set, the same key) waits with one line and reuses both."""
    log = tmp_path / "starts.log"
    with _drivers(tmp_path) as (start, procs):
        a = start("all", "a")
        _wait_for(lambda: (0, a.pid) in _starts(log), "A to start batch 0", procs)
        b = start("1", "b")
        _wait_for(lambda: (1, b.pid) in _starts(log), "B (disjoint batch) to start while A holds batch 0", procs)
        c = start("all", "c")
        # C either waits (one line) or, without a lock, starts batch 0 itself
        _wait_for(lambda: WAITING in _err(tmp_path, "c") or any(pid == c.pid for _, pid in _starts(log)),
                  "C to wait or to start", procs)
        (tmp_path / "GO").touch()
        outs = [p.communicate(timeout=180)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [_err(tmp_path, t) for t in "abc"]
    starts = _starts(log)
    assert sorted(k for k, _ in starts) == [0, 1], f"a batch was made more than once: {starts}"
    assert dict(starts) == {0: a.pid, 1: b.pid}
    assert _err(tmp_path, "c").count(WAITING) == 1, _err(tmp_path, "c")
    assert WAITING not in _err(tmp_path, "b")
    full_a, full_c = outs[0].split(), outs[2].split()
    assert full_a[0] == full_c[0] == "complete" and full_a[1:] == full_c[1:]
    assert not list(Path(full_a[3]).glob(".*.lock")), "the batch locks outlive the finished set"


def test_shared_cache_killed_lock_holder_is_taken_over(tmp_path):
    """A holds batch 0 and is SIGKILLed: its flock goes with it, and the waiting C makes the batch."""
    from zsq.data.shards import SyntheticSet

    log = tmp_path / "starts.log"
    with _drivers(tmp_path) as (start, procs):
        a = start("all", "a")
        _wait_for(lambda: (0, a.pid) in _starts(log), "A to start batch 0", procs)
        c = start("all", "c")
        _wait_for(lambda: WAITING in _err(tmp_path, "c") or any(pid == c.pid for _, pid in _starts(log)),
                  "C to wait or to start", procs)
        assert not any(pid == c.pid for _, pid in _starts(log)), "C made batch 0 while A was making it"
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=60) == -signal.SIGKILL
        procs.remove(a)
        _wait_for(lambda: (0, c.pid) in _starts(log), "C to take batch 0 over", procs)
        (tmp_path / "GO").touch()
        out = c.communicate(timeout=180)[0].split()
        assert c.returncode == 0, _err(tmp_path, "c")
    assert out[0] == "complete" and out[2] == "4"
    s = SyntheticSet.load(out[3])
    assert s.n_images == 4 and s.sha256 == out[1]


# -------------------------------------------------------------------------------------------------
# issue 33 item 5: Ctrl-C in the middle of a batch, then --resume

GENIE_FAST = ["--recipe", "genie", "--budget", "smoke", "--synth-set", "precision=fp32", "--synth-set",
              "channels_last=false", "--synth-set", "n_images=16", "--synth-set", "batch_size=8",
              "--synth-set", "iters=12", "--threads", "1"]
ITER = re.compile(r"batch (\d+): (\d+)/(\d+)")


def _iterations(text: str) -> list[tuple[int, int]]:
    """(batch, finished iterations) of every progress line (``ZSQ_PROGRESS_EVERY=0``: one per iteration)."""
    return [(int(m.group(1)), int(m.group(2))) for m in ITER.finditer(text)]


def _sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C as in a terminal, even if the runner ignores SIGINT


def test_ctrl_c_mid_batch_then_resume_continues_that_batch(tmp_path):
    """`zsq quantize --recipe genie` (2 batches): Ctrl-C a few iterations into batch 1, then `--resume`:
    batch 0 is skipped, batch 1 continues after its last finished iteration, and the images equal an
    uninterrupted run's (torch.equal)."""
    from zsq.data.shards import SyntheticSet

    cache, out = tmp_path / "cache", tmp_path / "out"
    # no periodic checkpoint: the one resumed from is written by the Ctrl-C
    env = _env(cache, ZSQ_PROGRESS_EVERY=0, ZSQ_SYNTH_CKPT_EVERY_S=1e9)
    cmd = [sys.executable, "-m", "zsq", "quantize", "cifar10_resnet20", *GENIE_FAST, "--quant", "calib",
           "--w", "4", "--a", "8", "-o", str(out)]
    err = open(tmp_path / "first.err", "w+")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO, preexec_fn=_sigint_default)
    try:
        _wait_for(lambda: (1, 3) in _iterations((tmp_path / "first.err").read_text()), "batch 1 iteration 3", [p])
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    first = (tmp_path / "first.err").read_text()
    assert rc in (130, -signal.SIGINT) and "Traceback" not in first, first[-3000:]
    stopped = max(it for b, it in _iterations(first) if b == 1)
    sets = list((cache / "synthetic").glob("genie-*"))
    assert len(sets) == 1 and (sets[0] / "shard_00000.json").is_file() and not (sets[0] / "shard_00001.pt").exists()
    assert not (out / "zsq.json").exists()

    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    its = _iterations(r.stderr)
    assert all(b == 1 for b, _ in its), "a finished batch was made again"
    assert its and its[0][1] > 1 and its[0][1] >= stopped, f"batch 1 started again from 0 ({its[:3]})"
    assert not list(sets[0].glob(".partial_*")), "the mid-batch checkpoint outlives its batch"

    ref = tmp_path / "ref"  # an uninterrupted run of the same settings
    r2 = run_zsq("synthesize", "cifar10_resnet20", *GENIE_FAST, "-q", "-o", ref, env=_env(tmp_path / "cache2"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = SyntheticSet.load(sets[0]), SyntheticSet.load(ref)
    assert a.sha256 == b.sha256 and torch.equal(a.images, b.images)
    import json

    assert json.loads((out / "zsq.json").read_text())["synthetic"]["sha256"] == b.sha256


def test_sigkill_mid_batch_resumes_from_the_periodic_checkpoint(tmp_path):
    """A run killed outright (no chance to save) continues from its last periodic mid-batch checkpoint."""
    from zsq.data.shards import SyntheticSet

    env = _env(tmp_path / "cache", ZSQ_PROGRESS_EVERY=0, ZSQ_SYNTH_CKPT_EVERY_S=0)  # a checkpoint every iteration
    args = ["synthesize", "cifar10_resnet20", "--recipe", "zeroq", "--budget", "smoke", "--synth-set",
            "precision=fp32", "--synth-set", "iters=40", "--n-images", "8", "--threads", "1"]
    killed = tmp_path / "killed"
    err = open(tmp_path / "killed.err", "w+")
    p = subprocess.Popen([sys.executable, "-m", "zsq", *args, "-o", str(killed)], stdout=subprocess.DEVNULL,
                         stderr=err, env=env, cwd=REPO)
    try:
        _wait_for(lambda: (0, 5) in _iterations((tmp_path / "killed.err").read_text()), "iteration 5", [p])
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert (killed / ".partial_00000.pt").is_file() and not (killed / "shard_00000.pt").exists()
    r = run_zsq(*args, "-o", killed, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    its = _iterations(r.stderr)
    assert its and its[0][1] > 1, f"the batch started again from 0 ({its[:3]})"
    r2 = run_zsq(*args, "-q", "-o", tmp_path / "full", env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = SyntheticSet.load(killed), SyntheticSet.load(tmp_path / "full")
    assert a.sha256 == b.sha256 and torch.equal(a.images, b.images)
