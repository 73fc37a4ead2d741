"""Robustness through the real CLI: runs killed with SIGKILL resume to the same tensors as an
uninterrupted run (synthesis and reconstruction), and concurrent runs sharing a cache do not
interfere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _env(cache: Path) -> dict:
    return {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "ZSQ_CACHE": str(cache)}


def _zsq(*args, env):
    return [sys.executable, "-m", "zsq", *map(str, args)]


def _kill_when(cmd, env, ready, timeout=240.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds (it must still be running)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert p.poll() is None, f"finished before it could be killed: {p.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert p.poll() is None, "finished before it could be killed"
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sigkill_mid_synthesis_then_rerun_equals_uninterrupted(tmp_path):
    from zsq.data.shards import SyntheticSet

    env = _env(tmp_path / "cache")
    args = ["synthesize", "cifar10_resnet20", "--recipe", "zeroq", "--budget", "smoke", "--n-images", "160",
            "--seed", "5", "--threads", "1", "-q"]
    killed = tmp_path / "killed"
    _kill_when(_zsq(*args, "-o", killed, env=env), env, lambda: (killed / "shard_00000.json").is_file())
    assert not (killed / "meta.json").exists()  # incomplete, and says so
    r = subprocess.run(_zsq(*args, "-o", killed, env=env), capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    full = tmp_path / "full"
    r = subprocess.run(_zsq(*args, "-o", full, env=env), capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    a, b = SyntheticSet.load(killed), SyntheticSet.load(full)
    assert a.sha256 == b.sha256 and torch.equal(a.images, b.images)


def _tensors(out: Path) -> dict:
    p = torch.load(out / "qmodel.pt", map_location="cpu", weights_only=True)
    return {k: v for k, v in p["state_dict"].items() if isinstance(v, torch.Tensor)}


def test_sigkill_mid_reconstruction_then_resume_equals_uninterrupted(tmp_path):
    env = _env(tmp_path / "cache")
    syn = tmp_path / "syn"
    r = subprocess.run(_zsq("synthesize", "cifar10_resnet20", "--recipe", "genie", "--budget", "smoke", "-q",
                            "-o", syn, env=env), capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    q = ["quantize", "cifar10_resnet20", "--recipe", "genie", "--budget", "smoke", "--w", "4", "--a", "4",
         "--synthetic", syn, "--threads", "1", "-q", "--set", "iters=60", "--set", "ckpt_every_s=0.2"]
    killed = tmp_path / "killed"
    ck = killed / ".ckpt" / "recon.pt"
    _kill_when(_zsq(*q, "-o", killed, env=env), env, lambda: ck.is_file() and ck.stat().st_mtime > 0)
    assert not (killed / "zsq.json").exists()
    r = subprocess.run(_zsq(*q, "-o", killed, "--resume", env=env), capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    full = tmp_path / "full"
    r = subprocess.run(_zsq(*q, "-o", full, env=env), capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    a, b = _tensors(killed), _tensors(full)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_concurrent_runs_sharing_a_cache_do_not_interfere(tmp_path):
    env = _env(tmp_path / "cache")  # both make the same synthetic set in the same cache directory
    args = ["quantize", "cifar10_resnet20", "--recipe", "zeroq", "--budget", "smoke", "--w", "4", "--a", "4",
            "--threads", "1", "-q"]
    ps = [subprocess.Popen(_zsq(*args, "-o", tmp_path / f"out{i}", env=env), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, env=env, cwd=REPO) for i in range(2)]
    for p in ps:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    a, b = _tensors(tmp_path / "out0"), _tensors(tmp_path / "out1")
    for k in a:
        assert torch.equal(a[k], b[k]), k
