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
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

from .errors import BadValueError

#: CPU flags (``/proc/cpuinfo``) with native bf16 arithmetic
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
AUTO_CHOICES = ("bf16", "fp32")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16() -> bool:
    """True where this CPU computes bf16 natively (AVX-512 BF16 / AMX-BF16)."""
    return bool(BF16_FLAGS & cpu_flags())


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a CPU with native bf16, else ``fp32`` (``ZSQ_PRECISION`` overrides);
    any other value is returned as it is."""
    if precision != "auto":
        return precision
    env = os.environ.get("ZSQ_PRECISION", "").strip().lower()
    if env:
        if env not in AUTO_CHOICES:
            raise BadValueError(f"ZSQ_PRECISION must be bf16 or fp32, got '{env}'")
        return env
    return "bf16" if native_bf16() else "fp32"


__all__ = ["AUTO_CHOICES", "BF16_FLAGS", "cpu_flags", "cpu_name", "native_bf16", "resolve_precision"]
