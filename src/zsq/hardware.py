"""What the machine computes fast: the ``precision="auto"`` of synthesis resolves here.

bf16 autocast pays only where the CPU has bf16 arithmetic (AVX-512 BF16 or AMX-BF16): there, pixel
optimisation of ResNet-20 runs 1.5-1.9x faster than fp32 with the same loss trajectory. Without it
(AVX2, or AVX-512 without BF16) oneDNN emulates bf16 and the same work runs several times *slower* than
fp32 (ZeroQ's smoke budget: 183 s in bf16 vs 12 s in fp32 on a 2-core AMD EPYC with AVX2 only). So
``auto`` means bf16 where it is native and fp32 elsewhere; the resolved value is what a run records
(config, cache key, ``zsq.json``), so a set made in bf16 is never served to an fp32 request.

``ZSQ_PRECISION=bf16|fp32`` fixes what ``auto`` resolves to on every machine (the fingerprints of
``bench/fingerprints.py`` pin bf16 so they compare across machines); an explicit ``precision=`` wins
over both.

Devices (``--device``, ``device=``): :func:`resolve_device` is the one place a device name is read.
``auto`` is ``cuda:LOCAL_RANK`` under torchrun when CUDA is there, else ``cuda``, else ``cpu``. On a CUDA
device ``precision="auto"`` resolves to bf16 where the GPU computes it
(``torch.cuda.is_bf16_supported()``), else fp16 with a gradient scaler (:class:`Amp`); the
device type is part of a synthetic set's cache key only when it is not ``cpu``, so every CPU key is the
one it was before devices existed. Everything else follows the rule: a tensor is made on the device
(and dtype) of the model or the data it belongs to.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import platform
from pathlib import Path
from typing import Iterator

import torch

from .errors import BadValueError

#: CPU flags (``/proc/cpuinfo``) with native bf16 arithmetic
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
AUTO_CHOICES = ("bf16", "fp32")


@functools.lru_cache(maxsize=1)
def _first_cpu() -> dict[str, str]:
    """The first CPU block of Linux ``/proc/cpuinfo`` as {field: value}; empty where it cannot be read."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    cpu = _first_cpu()
    return frozenset((cpu.get("flags") or cpu.get("Features") or "").split())


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows of it."""
    return _first_cpu().get("model name") or platform.processor() or platform.machine()


def native_bf16() -> bool:
    """True where this CPU computes bf16 natively (AVX-512 BF16 / AMX-BF16)."""
    return bool(BF16_FLAGS & cpu_flags())


#: the device a config's ``precision="auto"`` resolves for (:func:`on_device`; the CPU unless set)
_PRECISION_DEVICE: contextvars.ContextVar[torch.device] = contextvars.ContextVar("zsq_precision_device",
                                                                                  default=torch.device("cpu"))


@contextlib.contextmanager
def on_device(device: torch.device | str | None) -> Iterator[None]:
    """Within: ``precision="auto"`` resolves for ``device`` (configs made here: the synthesizer of a
    model on that device)."""
    token = _PRECISION_DEVICE.set(torch.device(device) if device is not None else torch.device("cpu"))
    try:
        yield
    finally:
        _PRECISION_DEVICE.reset(token)


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> on the CPU ``bf16`` where it has native bf16, else ``fp32``; on a CUDA device ``bf16``
    where the GPU supports it, else ``fp16`` (autocast with a gradient scaler, :class:`Amp`;
    ``ZSQ_PRECISION`` overrides both); any other value is
    returned as it is. ``device``: default the one of the enclosing :func:`on_device` (the CPU)."""
    if precision != "auto":
        return precision
    env = os.environ.get("ZSQ_PRECISION", "").strip().lower()
    if env:
        if env not in AUTO_CHOICES:
            raise BadValueError(f"ZSQ_PRECISION must be bf16 or fp32, got '{env}'")
        return env
    dev = torch.device(device) if device is not None else _PRECISION_DEVICE.get()
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if native_bf16() else "fp32"


def cuda_without_bf16(device: torch.device | str) -> bool:
    """True for a CUDA device that does not compute bf16 (``torch.cuda.is_bf16_supported()`` false there)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    with torch.cuda.device(dev):  # (the CPU never gets here: nothing about a CPU run changes)
        return not torch.cuda.is_bf16_supported()


class Amp:
    """The mixed precision of one training loop, the one place its autocast and loss scaling are chosen.

    ``precision``: ``fp32`` (no autocast), ``bf16`` (bf16 autocast by the device type) or ``fp16``. On a CUDA
    device without bf16 a ``bf16`` request runs as ``fp16``. ``fp16`` autocasts to float16 and scales the
    loss with ``torch.amp.GradScaler`` (gradients unscaled before the step, a step with inf/NaN gradients
    skipped, the scale updated once per iteration). For ``fp32`` / ``bf16`` :meth:`backward` and
    :meth:`step` are the plain ``loss.backward()`` / ``opt.step()`` calls, so every CPU run is the one it
    was. Usage::

        amp = Amp(cfg.precision, device)
        with amp.autocast():
            loss = f(x)
        amp.backward(loss)
        amp.step(opt_a, opt_b)  # then scaler.update(), once
    """

    def __init__(self, precision: str, device: torch.device | str):
        self.device = torch.device(device)
        self.precision = precision = self.choose(precision, self.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    @staticmethod
    def choose(precision: str, device: torch.device | str) -> str:
        """The precision a loop runs in: ``precision`` (fp32 / bf16 / fp16), except ``bf16`` on a CUDA device
        without bf16, which runs as ``fp16``."""
        if precision not in ("fp32", "bf16", "fp16"):
            raise BadValueError(f"precision must be fp32, bf16 or fp16, got '{precision}'")
        if precision == "bf16" and cuda_without_bf16(device):
            return "fp16"
        return precision

    def autocast(self):
        """Autocast for the forward pass (a null context in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward(**kwargs)``, of the scaled loss under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(**kwargs)

    def unscale(self, *optimizers) -> None:
        """Under fp16: the gradients of ``optimizers`` back to their true scale (before reading or clipping
        them); a no-op otherwise."""
        if self.scaler is not None:
            for opt in optimizers:
                self.scaler.unscale_(opt)

    def step(self, *optimizers) -> None:
        """``opt.step()`` for each (``None`` skipped); under fp16 through the scaler, then one scale update."""
        for opt in optimizers:
            if opt is None:
                continue
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device a run uses: ``auto`` (or None) -> ``cuda:LOCAL_RANK`` under torchrun when CUDA is
    available, else ``cuda`` when it is, else ``cpu``; ``cpu``; ``cuda`` / ``cuda:N`` (a one-line
    :class:`BadValueError` when CUDA is unavailable or N is not a device here)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = os.environ.get("LOCAL_RANK")
        if local is not None and "WORLD_SIZE" in os.environ:
            try:
                idx = int(local)
            except ValueError:
                raise BadValueError(f"LOCAL_RANK must be an integer, got '{local}'") from None
            return resolve_device(f"cuda:{idx}")
        return torch.device("cuda")
    if text == "cpu":
        return torch.device("cpu")
    kind, sep, index = text.partition(":")
    if kind != "cuda" or (sep and not index.isdigit()):
        raise BadValueError(f"--device must be auto, cpu, cuda or cuda:N, got '{spec}'")
    if not torch.cuda.is_available():
        raise BadValueError(f"--device {text}: CUDA is not available on this machine (torch "
                            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    if sep:
        n = torch.cuda.device_count()
        if int(index) >= n:
            raise BadValueError(f"--device {text}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return torch.device("cuda", int(index))
    return torch.device("cuda")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def set_backend_flags(device: torch.device) -> None:
    """On CUDA: ``cudnn.benchmark`` (the convolutions of a fixed input size pick their fastest
    algorithm); on the CPU nothing."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def device_record(device: torch.device | str) -> dict:
    """What ``zsq.json`` says of the device: ``{"device": "cpu"}``, or for CUDA the GPU's name, memory,
    count and the CUDA / cuDNN versions of torch."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"device": dev.type}
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    return {"device": "cuda", "gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


__all__ = ["AUTO_CHOICES", "Amp", "BF16_FLAGS", "cuda_without_bf16", "cpu_flags", "cpu_name", "device_record", "module_device",
           "native_bf16", "on_device", "resolve_device", "resolve_precision", "set_backend_flags"]
