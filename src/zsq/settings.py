"""Quantizer settings: each value that ``--set KEY=VALUE`` (and ``zsq.quantize(..., hparams=...)``) may
give, with its type and allowed values, declared per quantizer and per pre-step (``pre:NAME``).

:func:`check_hparams` (called by :func:`zsq.api.resolve`, before a model is loaded or an image made)
turns a CLI string into the declared type (``"false"`` -> ``False``, ``"64"`` -> ``64``) and refuses a
value of the wrong type or outside its choices with a one-line :class:`~zsq.errors.BadValueError` that
lists the choices and suggests the closest one. Values of the right type pass unchanged.

Each quantizer's table comes from its config dataclasses (:meth:`zsq.config.Config.settings`: the field
annotations give the types, the fields' metadata the allowed strings and lower bounds):
:class:`~zsq.ptq.quantizers.CalibConfig`, :class:`~zsq.ptq.datafree.DataFreeConfig`,
:class:`~zsq.ptq.dfq.DFQPreConfig`, :class:`~zsq.ptq.reconstruct.ReconConfig` with the engine's
:class:`~zsq.ptq.reconstruct.ReconEngineConfig` (and BRECQ's :class:`~zsq.ptq.recon_units.BrecqActConfig`),
:class:`~zsq.qat.engine.QATConfig`, :class:`~zsq.gen.loop.GenConfig` and the games of
:mod:`zsq.gen.objectives`; only the QAT and generator trainers' ``stop_at`` test hook is declared here. The
conversion itself is :mod:`zsq.config`'s. The keys are exactly :data:`zsq.recipes.HPARAM_KEYS` (a test checks
it for every registered quantizer and pre-step). Cross-field rules (e.g. enough steps after the warm-up) stay in the
configs' ``__post_init__``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .config import KINDS, Setting, settings_of  # noqa: F401  (Setting, KINDS, settings_of: re-exported)


_TABLE: dict[str, dict[str, Setting]] | None = None


def settings_table() -> dict[str, dict[str, Setting]]:
    """quantizer name (or ``pre:NAME``) -> {key: Setting}. Built on first use, after every quantizer module
    has registered (``zsq.catalogue`` imports them)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _build()
    return _TABLE


def _build() -> dict[str, dict[str, Setting]]:
    from . import catalogue  # noqa: F401  (registers every quantizer)
    from .gen.loop import GenConfig
    from .gen.objectives import GAMES
    from .gen.quantizers import GAME_OF, LOOP_KEYS
    from .ptq.datafree import CONFIGS as DATAFREE_CONFIGS
    from .ptq.dfq import DFQPreConfig
    from .ptq.quantizers import CalibConfig
    from .ptq.reconstruct import RECON_METHODS, BrecqActConfig, ReconConfig, ReconEngineConfig
    from .qat.engine import QATConfig

    table: dict[str, dict[str, Setting]] = {}

    # range calibration (calib; calib-sparse is calib with SMI's kept-token forward)
    table["calib"] = table["calib-sparse"] = dict(CalibConfig.settings())

    # block reconstruction: ReconConfig fields + the engine's options (+ BRECQ's activation pass)
    recon = {**ReconConfig.settings(), **ReconEngineConfig.settings()}
    for m in RECON_METHODS:
        table[m] = dict(recon)
    table["brecq"].update(BrecqActConfig.settings())

    # the data-free quantizers (dfq / squant / udfc) and the dfq pre-step
    table.update({name: dict(cls.settings()) for name, cls in DATAFREE_CONFIGS.items()})
    table["pre:dfq"] = dict(DFQPreConfig.settings())

    # the fixed-set QAT loop and the generator games (stop_at: a test hook of the trainers, (epoch, step))
    stop_at = Setting("ints", optional=True, length=2)
    table["qat-kd"] = {**QATConfig.settings(), "stop_at": stop_at}
    loop = {k: s for k, s in GenConfig.settings().items() if k in LOOP_KEYS}
    for name, game in GAME_OF.items():
        table[name] = {**loop, **GAMES[game].settings(), "stop_at": stop_at}
    return table


def check_hparams(hparams: dict[str, Any], owners: Iterable[str | None]) -> dict[str, Any]:
    """``hparams`` with every value checked (and CLI strings converted) against the first of ``owners``
    (quantizer names, ``pre:NAME``) that declares the key; a key none declares passes unchanged (the
    caller refuses unknown keys)."""
    table = settings_table()
    owners = [o for o in owners if o and o in table]
    out = {}
    for k, v in hparams.items():
        s = next((table[o][k] for o in owners if k in table[o]), None)
        out[k] = v if s is None else s.check(k, v)
    return out
