"""zsq.train: the parts the training loops share (seeds, schedules, checkpoint / resume, Ctrl-C)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from zsq.errors import BadValueError
from zsq.train import (
    Every, Fingerprint, cosine_lr, derive_seed, read_checkpoint, seeded_generator, stop_if_interrupted,
    warmup_cosine_lr, write_checkpoint,
)


def test_derive_seed_is_the_loops_step_seeds():
    # the strings the QAT engine, reconstruction and synthesis hashed before the seeds were shared
    for ns, parts, text in (("zsq-qat", (0, 1, 2), "zsq-qat/0/1/2"), ("zsq-recon", (3, 0, 1, 7), "zsq-recon/3/0/1/7"),
                            ("zsq-synth", (5, -1), "zsq-synth/5/-1")):
        h = hashlib.sha256(text.encode()).digest()
        assert derive_seed(ns, *parts) == int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
    assert derive_seed("zsq-qat", 0, 1, 2) != derive_seed("zsq-qat", 0, 2, 1)
    assert 0 <= derive_seed("x", 1) < 2 ** 63


def test_seeded_step_is_reproducible():
    def step(seed: int, k: int) -> torch.Tensor:
        g = seeded_generator(derive_seed("zsq-test", seed, k))
        return torch.cat([torch.randperm(10, generator=g).float(), torch.rand(4, generator=g)])

    a = [step(0, k) for k in range(3)]
    assert torch.equal(step(0, 2), a[2])  # step 2 alone draws what it drew after steps 0 and 1
    assert not torch.equal(a[0], a[1]) and not torch.equal(step(1, 0), a[0])


def test_schedule_values():
    assert cosine_lr(0.1, 0, 100) == 0.1
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.0, abs=1e-18)
    assert cosine_lr(0.1, 25, 100) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(0.1, 0, 0) == 0.1  # total 0: no division by zero
    # DeepInversion's policy: linear warm-up, then the cosine over the remaining iterations
    assert warmup_cosine_lr(0.2, 0, 2000, 100) == pytest.approx(0.002)
    assert warmup_cosine_lr(0.2, 99, 2000, 100) == pytest.approx(0.2)
    assert warmup_cosine_lr(0.2, 100, 2000, 100) == 0.2
    assert warmup_cosine_lr(0.2, 1050, 2000, 100) == cosine_lr(0.2, 950, 1900)
    # the same float as DeepInversion's ``0.5 * (1 + cos(...)) * base_lr`` ordering
    for it in range(0, 2000, 7):
        old = 0.5 * (1 + math.cos(math.pi * (it - 100) / 1900)) * 0.2
        assert it < 100 or warmup_cosine_lr(0.2, it, 2000, 100) == old


def test_checkpoint_round_trip_and_fingerprint_mismatch_refused(tmp_path):
    path = tmp_path / "run.pt"
    assert read_checkpoint(path, "test checkpoint", "fmt-1", "abc") is None  # nothing yet
    assert read_checkpoint(None, "test checkpoint", "fmt-1", "abc") is None
    write_checkpoint(path, "fmt-1", "abc", {"step": 3, "w": torch.arange(4.0)})
    ck = read_checkpoint(path, "test checkpoint", "fmt-1", "abc")
    assert ck["step"] == 3 and torch.equal(ck["w"], torch.arange(4.0))
    with pytest.raises(BadValueError, match="other settings or data"):
        read_checkpoint(path, "test checkpoint", "fmt-1", "another run")
    with pytest.raises(BadValueError, match="other settings or data"):
        read_checkpoint(path, "test checkpoint", "fmt-2", "abc")
    # a disposable checkpoint (mid-batch) of another run is dropped, not refused
    assert read_checkpoint(path, "test checkpoint", "fmt-1", "another run", strict=False) is None
    assert not path.exists()


def test_fingerprint_depends_on_settings_and_tensors():
    sd = {"w": torch.ones(2, 2), "b": torch.zeros(2)}

    def fp(settings, state, images):
        return Fingerprint().settings(settings).state(state).tensor(images).hexdigest()

    base = fp({"lr": 0.1}, sd, torch.zeros(1, 3))
    assert base == fp({"lr": 0.1}, dict(sd), torch.zeros(1, 3))
    assert base != fp({"lr": 0.2}, sd, torch.zeros(1, 3))
    assert base != fp({"lr": 0.1}, {**sd, "b": torch.ones(2)}, torch.zeros(1, 3))
    assert base != fp({"lr": 0.1}, sd, torch.ones(1, 3))
    extended = Fingerprint(base.encode()).settings({"game": "gdfq"}).hexdigest()
    assert extended != base and extended == Fingerprint(base.encode()).settings({"game": "gdfq"}).hexdigest()


def test_stop_if_interrupted_saves_then_raises():
    saved = []
    stop_if_interrupted({"hit": False}, lambda: saved.append(1))
    assert saved == []
    with pytest.raises(KeyboardInterrupt):
        stop_if_interrupted({"hit": True}, lambda: saved.append(1))
    assert saved == [1]
    with pytest.raises(KeyboardInterrupt):
        stop_if_interrupted({"hit": True})  # nothing to save


def test_every():
    assert Every(0.0).due()
    e = Every(1e9)
    assert not e.due()
