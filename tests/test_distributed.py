"""Synthesis sharded over two real torch.distributed ranks (torchrun, gloo, localhost) equals the
single-process set image for image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _zsq_synth(args, env, torchrun: bool = False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"] \
        if torchrun else [sys.executable, "-m"]
    return subprocess.run([*launcher, "zsq", "synthesize", "cifar10_resnet20", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def test_two_ranks_equal_one_process(tmp_path):
    from zsq.data.shards import SyntheticSet

    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "ZSQ_CACHE": str(tmp_path / "cache")}
    # zeroq's smoke budget makes batches of 32: 4 batches, 2 per rank (ranks 0 and 1 interleave)
    common = ["--recipe", "zeroq", "--budget", "smoke", "--n-images", "128", "--seed", "3", "--threads", "1", "-q"]
    one = _zsq_synth([*common, "-o", tmp_path / "one"], env)
    assert one.returncode == 0, one.stderr
    two = _zsq_synth([*common, "-o", tmp_path / "two"], env, torchrun=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("128 images in") == 1  # rank 0 reports, once
    a, b = SyntheticSet.load(tmp_path / "one"), SyntheticSet.load(tmp_path / "two")
    assert a.complete and b.complete and len(a.shards) == len(b.shards) == 4
    assert a.sha256 == b.sha256
    for sa, sb in zip(a.shards, b.shards):
        assert sa["sha256"] == sb["sha256"]
    assert torch.equal(a.images, b.images)


def test_unshardable_synthesizer_is_refused(monkeypatch):
    from zsq.distributed import synthesize_sharded
    from zsq.errors import BadValueError
    from zsq.synth.base import SYNTHESIZERS

    cls = SYNTHESIZERS["gaussian"]
    monkeypatch.setattr(cls, "shardable", False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BadValueError, match="cannot be sharded"):
        synthesize_sharded(torch.nn.Conv2d(3, 3, 1), "gaussian", budget="smoke")
