"""Errors a user can cause. Each carries a one-line message with the fix; the CLI prints it and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ZsqError(Exception):
    """Base class of every error a user can cause (bad name, bad file, bad option)."""


class UnknownNameError(ZsqError, KeyError):
    """A model, recipe, synthesizer, quantizer, protocol or budget name that is not registered."""

    def __init__(self, kind: str, name: str, choices: Iterable[str]):
        choices = sorted(choices)
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of: {', '.join(choices)}"
        super().__init__(f"unknown {kind} '{name}': {hint}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class BadValueError(ZsqError, ValueError):
    """An option value out of range or malformed (bits, --layer-bits, --mean ...)."""


class WeightsError(ZsqError):
    """A weights file that is missing, corrupt, fails its checksum or belongs to another architecture."""


class ChecksumError(WeightsError):
    """A downloaded or cached file whose SHA-256 does not match the expected one."""


class DataError(ZsqError):
    """An evaluation / calibration / synthetic data path that is missing or malformed."""


class OutputExistsError(ZsqError):
    """The output directory already holds a finished result."""


class OutputError(ZsqError):
    """An output (``-o OUT``, ``ZSQ_CACHE``) that cannot be written: read-only, no permission, disk full."""


class UnsupportedLayerError(ZsqError):
    """A layer type zsq cannot quantize, with --strict."""
