"""Quantizer settings: each value that ``--set KEY=VALUE`` (and ``zsq.quantize(..., hparams=...)``) may
give, with its type and allowed values, declared per quantizer and per pre-step (``pre:NAME``).

:func:`check_hparams` (called by :func:`zsq.api.resolve`, before a model is loaded or an image made)
turns a CLI string into the declared type (``"false"`` -> ``False``, ``"64"`` -> ``64``) and refuses a
value of the wrong type or outside its choices with a one-line :class:`~zsq.errors.BadValueError` that
lists the choices and suggests the closest one. Values of the right type pass unchanged.

Each quantizer's table comes from its config dataclass (:func:`zsq.config.settings_of`: the field
annotations give the types; the allowed strings and lower bounds come from the fields' metadata, as in
:class:`~zsq.ptq.quantizers.CalibConfig`, :class:`~zsq.ptq.datafree.DataFreeConfig`,
:class:`~zsq.ptq.dfq.DFQPreConfig`, :class:`~zsq.ptq.reconstruct.ReconConfig` with the engine's
:class:`~zsq.ptq.reconstruct.ReconEngineConfig` and BRECQ's :class:`~zsq.ptq.recon_units.BrecqActConfig`, or
from the tables in :func:`_build` for :class:`~zsq.qat.engine.QATConfig`, :class:`~zsq.gen.loop.GenConfig`
and the games of :mod:`zsq.gen.objectives`); only the trainers' ``stop_at`` test hooks are declared here.
The conversion itself is :mod:`zsq.config`'s. The keys are exactly :data:`zsq.recipes.HPARAM_KEYS` (a test checks it for every
registered quantizer and pre-step). Cross-field rules (e.g. enough steps after the warm-up) stay in the
configs' ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from .config import KINDS, Setting, settings_of  # noqa: F401  (Setting, KINDS: re-exported)


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
    from .gen.generators import ARC_GENOTYPES
    from .gen.loop import LR_SCHEDULES, GenConfig
    from .gen.objectives import GAMES
    from .gen.quantizers import GAME_OF, LOOP_KEYS
    from .ptq import reconstruct
    from .ptq.datafree import CONFIGS as DATAFREE_CONFIGS
    from .ptq.dfq import DFQPreConfig
    from .ptq.quantizers import CalibConfig
    from .qat import engine
    from .synth.losses import BNS_VARIANTS

    table: dict[str, dict[str, Setting]] = {}

    # range calibration (calib; calib-sparse is calib with SMI's kept-token forward)
    table["calib"] = table["calib-sparse"] = dict(CalibConfig.settings())

    # block reconstruction: ReconConfig fields + the engine's options (+ BRECQ's activation pass)
    recon = {**reconstruct.ReconConfig.settings(), **reconstruct.ReconEngineConfig.settings()}
    for m in reconstruct.RECON_METHODS:
        table[m] = dict(recon)
    table["brecq"].update(reconstruct.BrecqActConfig.settings())

    # the data-free quantizers (dfq / squant / udfc) and the dfq pre-step
    table.update({name: dict(cls.settings()) for name, cls in DATAFREE_CONFIGS.items()})
    table["pre:dfq"] = dict(DFQPreConfig.settings())

    # the fixed-set QAT loop and the generator games
    qat_choices = {"kd_reduction": engine.KD_REDUCTIONS, "precision": engine.PRECISIONS,
                   "bns_variant": tuple(BNS_VARIANTS), "ce_target": engine.CE_TARGETS, "ce_select": engine.CE_SELECTS,
                   "lr_schedule": LR_SCHEDULES, "arc_genotype": ("auto", *ARC_GENOTYPES)}
    counts = {"epochs": 1, "steps_per_epoch": 1, "batch_size": 1}
    table["qat-kd"] = {**settings_of(engine.QATConfig, qat_choices, counts),
                       "stop_at": Setting("ints", optional=True, length=2)}
    loop = settings_of(GenConfig, qat_choices, counts, keys=LOOP_KEYS)
    for name, game in GAME_OF.items():
        game_min = {f.name: 0 for f in dataclasses.fields(GAMES[game])} | {"latent_dim": 1, "g_steps": 1, "s_steps": 1}
        table[name] = {**loop, **settings_of(GAMES[game], qat_choices, game_min),
                       "stop_at": Setting("ints", optional=True, length=2)}
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
