"""Parts shared by zsq's training loops (synthesis batches, block reconstruction, the QAT engine, the
generator loop), each written once here:

* **seeded steps**: :func:`derive_seed` gives every step (batch, unit step, epoch step) its own 63-bit
  seed from a hash of the run seed and the step's coordinates, so a step draws the same numbers whether
  the run is resumed before it, made by one rank alone, or run straight through; :func:`seeded_generator`
  is the ``torch.Generator`` of such a seed;
* **lr schedules**: :func:`cosine_lr` (one cosine from ``base`` to 0) and :func:`warmup_cosine_lr`
  (DeepInversion's linear warm-up, then that cosine);
* **checkpoint / resume**: :class:`Fingerprint` hashes what a run depends on (settings, seed, initial
  tensors); :func:`write_checkpoint` / :func:`read_checkpoint` keep one resume file under its format tag
  and that fingerprint (atomic, SHA-256 trailer: :func:`zsq.paths.torch_save_checked`), refused (or, for a
  disposable one, dropped) when another run wrote it; :class:`Every` says when a periodic checkpoint is
  due; Ctrl-C is deferred to a step boundary by :func:`zsq.interrupt.deferred_sigint` and acted on by
  :func:`stop_if_interrupted` (save, then ``KeyboardInterrupt``);
* **progress**: :class:`zsq.progress.NestedBar`, re-exported here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .interrupt import deferred_sigint
from .paths import load_resume_checkpoint, torch_load_checked, torch_save_checked
from .progress import NestedBar


# --------------------------------------------------------------------------------------------------
# seeded steps
# --------------------------------------------------------------------------------------------------
def derive_seed(namespace: str, *parts: int) -> int:
    """A 63-bit seed from the SHA-256 of ``namespace/part/part/...`` (each part an integer): the seed of
    one step of one run, independent of every other step's (``derive_seed("zsq-qat", seed, epoch, step)``)."""
    h = hashlib.sha256("/".join([namespace, *(str(int(p)) for p in parts)]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (a step's own random stream)."""
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# learning-rate schedules
# --------------------------------------------------------------------------------------------------
def cosine_lr(base: float, step: int, total: int) -> float:
    """``base * (1 + cos(pi * step / total)) / 2`` (step 0-based: the first step runs at ``base``)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def warmup_cosine_lr(base_lr: float, it: int, iters: int, warmup: int) -> float:
    """DeepInversion's ``lr_cosine_policy(base_lr, warmup, iters)`` at iteration ``it``: linear from
    ``base_lr / warmup`` to ``base_lr`` over the first ``warmup`` iterations, then :func:`cosine_lr` over
    the others."""
    if it < warmup:
        return base_lr * (it + 1) / warmup
    return cosine_lr(base_lr, it - warmup, iters - warmup)


# --------------------------------------------------------------------------------------------------
# checkpoint / resume
# --------------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> bytes:
    """The fp32 bytes of ``t`` (contiguous, on the CPU): what a fingerprint hashes of a tensor."""
    return t.detach().float().contiguous().cpu().numpy().tobytes()


class Fingerprint:
    """The SHA-256 of what a run depends on, fed in order: :meth:`settings` (JSON, sorted keys),
    :meth:`state` (a state dict: each tensor's name, dtype and shape, then its fp32 bytes), :meth:`tensor`
    (fp32 bytes), :meth:`raw` (bytes). A resume checkpoint is written and read back under its
    :meth:`hexdigest`. ``start``: bytes hashed first (a fingerprint extended by a subclass)."""

    def __init__(self, start: bytes = b""):
        self.h = hashlib.sha256(start)

    def settings(self, obj: Any) -> Fingerprint:
        self.h.update(json.dumps(obj, sort_keys=True, default=str).encode())
        return self

    def state(self, state: Mapping[str, Any], *, dtype: bool = True) -> Fingerprint:
        """Every tensor of ``state`` by name (sorted); ``dtype=False`` leaves the dtype out of the header."""
        for k, v in sorted(state.items()):
            if isinstance(v, torch.Tensor):
                self.h.update((f"{k}:{v.dtype}:{tuple(v.shape)};" if dtype else f"{k}:{tuple(v.shape)};").encode())
                self.h.update(tensor_bytes(v))
        return self

    def tensor(self, t: torch.Tensor) -> Fingerprint:
        self.h.update(tensor_bytes(t))
        return self

    def raw(self, data: bytes) -> Fingerprint:
        self.h.update(data)
        return self

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def state_copy(model: torch.nn.Module) -> dict[str, Any]:
    """A detached copy of ``model``'s state dict (tensors cloned; extra states such as a quantizer's copied)."""
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in model.state_dict().items()}


def write_checkpoint(path: Path, fmt: str, fingerprint: str, state: dict[str, Any]) -> None:
    """Write the resume checkpoint ``{"format": fmt, "fingerprint": fingerprint, **state}`` to ``path``
    (atomic, SHA-256 trailer)."""
    torch_save_checked({"format": fmt, "fingerprint": fingerprint, **state}, path)


def read_checkpoint(path: Path | None, what: str, fmt: str, fingerprint: str, *,
                    strict: bool = True) -> dict[str, Any] | None:
    """The resume checkpoint at ``path`` written under ``fmt`` and ``fingerprint``, or ``None`` when there
    is none. ``strict``: one that cannot be read or that another run wrote is a one-line
    :class:`~zsq.errors.BadValueError` (:func:`zsq.paths.load_resume_checkpoint`); else (a disposable
    checkpoint, e.g. mid-batch) it is deleted, with a warning when it cannot be read, and ``None`` returned."""
    if path is None or not path.is_file():
        return None
    if strict:
        return load_resume_checkpoint(path, what, fmt, fingerprint)
    try:
        ck = torch_load_checked(path, what)
        ok = isinstance(ck, dict) and ck.get("format") == fmt and ck.get("fingerprint") == fingerprint
    except Exception as e:  # noqa: BLE001 - an unreadable disposable checkpoint is only lost time
        warnings.warn(f"{path} cannot be read ({e}); starting again", stacklevel=3)
        ok = False
    if not ok:
        path.unlink(missing_ok=True)
        return None
    return ck


class Every:
    """Says when ``every_s`` seconds have passed since it was made or last :meth:`reset` (a periodic
    checkpoint)."""

    def __init__(self, every_s: float):
        self.every_s = float(every_s)
        self.last = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.every_s

    def reset(self) -> None:
        self.last = time.perf_counter()


def stop_if_interrupted(flag: Mapping[str, bool], save: Callable[[], None] | None = None) -> None:
    """At a step boundary inside :func:`~zsq.interrupt.deferred_sigint`: after a Ctrl-C (``flag["hit"]``)
    call ``save`` (the checkpoint at this step, if any), then raise ``KeyboardInterrupt``."""
    if flag.get("hit"):
        if save is not None:
            save()
        raise KeyboardInterrupt


__all__ = [
    "Every", "Fingerprint", "NestedBar", "cosine_lr", "deferred_sigint", "derive_seed", "read_checkpoint",
    "seeded_generator", "state_copy", "stop_if_interrupted", "tensor_bytes", "warmup_cosine_lr",
    "write_checkpoint",
]
