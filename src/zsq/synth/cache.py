"""The synthetic-set cache's I/O beside the runner (:func:`zsq.synth.base.synthesize`): finished shards
found and checked, the per-batch file locks of processes sharing ``ZSQ_CACHE``, and the mid-batch
checkpoint of ``resumable`` synthesizers (:class:`BatchCheckpoint`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..data.shards import shard_name, sidecar_path
from ..errors import BadValueError, OutputExistsError
from ..paths import sha256_file, writing
from ..train import Every, read_checkpoint, stop_if_interrupted, write_checkpoint


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _finished_shard(d: Path, index: int, key: str, own_dir: bool) -> dict[str, Any] | None:
    """The sidecar of shard ``index`` if the shard is there and matches its checksum, else ``None``."""
    pt = d / shard_name(index)
    side = _read_json(sidecar_path(pt)) if pt.is_file() else None
    if side is None:
        return None
    if side.get("key") != key:
        if own_dir:
            raise OutputExistsError(f"{d} holds synthetic data made with other settings; "
                                    "choose another output directory or delete it")
        return None
    if sha256_file(pt) != side.get("sha256"):
        warnings.warn(f"synthetic shard {pt} fails its checksum (corrupt or modified); making it again", stacklevel=3)
        return None
    return side


def _batch_indices(batches: Iterable[int] | None, n_batches: int) -> list[int]:
    if batches is None:
        return list(range(n_batches))
    out = sorted({int(b) for b in batches})
    bad = [b for b in out if not 0 <= b < n_batches]
    if bad:
        raise BadValueError(f"batch index {bad[0]} out of range: this set has {n_batches} batches")
    return out


BATCH_CKPT_FORMAT = "zsq-synth-batch-1"
#: seconds between two mid-batch checkpoints (``ZSQ_SYNTH_CKPT_EVERY_S``; Ctrl-C always writes one)
CKPT_EVERY_S = 300.0


def _ckpt_every_s() -> float:
    v = os.environ.get("ZSQ_SYNTH_CKPT_EVERY_S", str(CKPT_EVERY_S))
    try:
        return max(0.0, float(v))
    except ValueError:
        raise BadValueError(f"ZSQ_SYNTH_CKPT_EVERY_S must be a number of seconds, got '{v}'") from None


def partial_name(index: int) -> str:
    return f".partial_{index:05d}.pt"


class BatchCheckpoint:
    """The mid-batch checkpoint of one batch of a ``resumable`` synthesizer (``.partial_0000k.pt`` beside
    the shards, checksummed, loaded with ``weights_only=True``).

    The synthesizer builds its loop's state as usual (same draws), then calls :meth:`restore`: with a
    checkpoint of this batch it gets the saved state back (to load into its tensors, optimisers,
    schedulers and generator) and continues at iteration :attr:`done`. After each iteration it calls
    :meth:`step_done`, which saves every ``every_s`` seconds and, after a Ctrl-C (``interrupt``), saves
    and raises ``KeyboardInterrupt``. It never saves after the last iteration: the shard follows.
    The runner's loss record (``rec``, ``trace``) and the batch's wall time travel with the state.
    """

    def __init__(self, path: Path, fingerprint: str, *, every_s: float, interrupt: dict[str, bool],
                 rec: dict[str, float], trace: list[list[float]]):
        self.path, self.fingerprint, self.every_s, self.interrupt = Path(path), fingerprint, every_s, interrupt
        self.rec, self.trace = rec, trace
        self.done = 0
        self.wall_before = 0.0
        self._t0 = time.perf_counter()
        self._periodic = Every(every_s)

    def restore(self) -> dict[str, Any] | None:
        """The saved state of this batch (and :attr:`done` set), or ``None`` to start at iteration 0 (an
        unreadable checkpoint, or another run's, is deleted)."""
        ck = read_checkpoint(self.path, "mid-batch checkpoint", BATCH_CKPT_FORMAT, self.fingerprint, strict=False)
        if ck is None:
            return None
        self.done = int(ck["done"])
        runner = ck.get("runner") or {}
        self.rec.update(runner.get("rec") or {})
        self.trace[:] = runner.get("trace") or []
        self.wall_before = float(runner.get("wall_s") or 0.0)
        return ck["state"]

    def step_done(self, done: int, total: int, state: Callable[[], dict[str, Any]]) -> None:
        """After iteration ``done - 1``: checkpoint on Ctrl-C (then ``KeyboardInterrupt``) or when due."""
        if done >= total:
            return
        stop_if_interrupted(self.interrupt, lambda: self.save(done, state()))
        if self._periodic.due():
            self.save(done, state())

    def save(self, done: int, state: dict[str, Any]) -> None:
        write_checkpoint(self.path, BATCH_CKPT_FORMAT, self.fingerprint, {
            "done": int(done), "state": state,
            "runner": {"rec": dict(self.rec), "trace": list(self.trace), "wall_s": self.wall_s}})
        self._periodic.reset()

    @property
    def wall_s(self) -> float:
        """Seconds spent on this batch, over every process that worked on it."""
        return self.wall_before + time.perf_counter() - self._t0

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def lock_name(index: int) -> str:
    return f".shard_{index:05d}.lock"


@contextlib.contextmanager
def _batch_lock(d: Path, index: int, note: Callable[[str], None]):
    """Hold batch ``index``'s file lock in ``d`` (``flock``: released by the OS if this process dies);
    when another process holds it, say so in one line and wait."""
    from filelock import FileLock, Timeout

    path = d / lock_name(index)
    try:  # never filelock's marker-file fallback: a killed holder would keep it for ever
        lock = FileLock(str(path), fallback_to_soft=False)
    except TypeError:  # filelock < 4 has no fallback
        lock = FileLock(str(path))
    try:
        with writing(path):
            try:
                lock.acquire(timeout=0)
            except Timeout:
                note(f"batch {index} of {d} is being made by another process (lock {path.name}); "
                     "waiting to reuse its shards")
                lock.acquire()
    except (NotImplementedError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
            raise
        warnings.warn(f"{d}: this file system has no file locks, so processes sharing it may make the same "
                      "batch twice", stacklevel=3)
        yield
        return
    try:
        yield
    finally:
        lock.release()
