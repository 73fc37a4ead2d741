"""Quantizer settings: each value that ``--set KEY=VALUE`` (and ``zsq.quantize(..., hparams=...)``) may
give, with its type and allowed values, declared per quantizer and per pre-step (``pre:NAME``).

:func:`check_hparams` (called by :func:`zsq.api.resolve`, before a model is loaded or an image made)
turns a CLI string into the declared type (``"false"`` -> ``False``, ``"64"`` -> ``64``) and refuses a
value of the wrong type or outside its choices with a one-line :class:`~zsq.errors.BadValueError` that
lists the choices and suggests the closest one. Values of the right type pass unchanged.

Where a quantizer has a config dataclass (:class:`~zsq.ptq.reconstruct.ReconConfig`,
:class:`~zsq.qat.engine.QATConfig`, :class:`~zsq.gen.loop.GenConfig` and the games of
:mod:`zsq.gen.objectives`) the field annotations give the types and :data:`CHOICES` the allowed strings;
the others (range calibration, the data-free quantizers, the ``dfq`` pre-step, the reconstruction
engine's options) are declared here. The keys are exactly :data:`zsq.recipes.HPARAM_KEYS` (a test
checks it for every registered quantizer and pre-step). Cross-field rules (e.g. enough steps after the
warm-up) stay in the configs' ``__post_init__``.
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
    from .data.augment import AUGMENT_MODES
    from .gen.generators import ARC_GENOTYPES
    from .gen.loop import LR_SCHEDULES, GenConfig
    from .gen.objectives import GAMES
    from .gen.quantizers import GAME_OF, LOOP_KEYS
    from .ptq import reconstruct
    from .ptq.datafree import ACT_RANGES
    from .ptq.dfq import RELU6_MODES
    from .ptq.squant import MODES
    from .ptq.udfc import COV_MODES, FITS
    from .qat import engine
    from .quant.observers import OBSERVERS, WEIGHT_OBSERVERS
    from .synth.losses import BNS_VARIANTS

    w_obs, a_obs = Setting("str", WEIGHT_OBSERVERS), Setting("str", OBSERVERS)
    flag = Setting("bool")
    threads = Setting("int", optional=True, minimum=0)  # 0 / null: leave torch's thread count as it is
    table: dict[str, dict[str, Setting]] = {}

    # range calibration (calib; calib-sparse is calib with SMI's kept-token forward)
    table["calib"] = table["calib-sparse"] = {"w_observer": w_obs, "a_observer": a_obs,
                                              "calib_batch": Setting("int", minimum=1), "sequential": flag}

    # block reconstruction: ReconConfig fields + the engine's options (+ BRECQ's activation pass)
    recon = {**settings_of(reconstruct.ReconConfig,
                            {"w_scale_param": reconstruct.W_SCALE_PARAMS, "granularity": reconstruct.GRANULARITIES,
                             "a_observer": OBSERVERS, "precision": reconstruct.PRECISIONS},
                            {"iters": 0, "batch_size": 1, "a_init_images": 1, "cache_batch": 1}),
             "ckpt_every_s": Setting("float"), "augment": Setting("str", AUGMENT_MODES),
             "augment_copies": Setting("int", minimum=1), "augment_pad": Setting("int", minimum=0),
             "w_observer": w_obs, "stop_at": Setting("ints", optional=True, length=3)}  # stop_at: a test hook
    for m in reconstruct.RECON_METHODS:
        table[m] = dict(recon)
    table["brecq"].update(lr_a=Setting("float"), iters_a=Setting("int", minimum=0))

    # the data-free quantizers (dfq / squant / udfc) and the dfq pre-step
    table["dfq"] = table["squant"] = table["udfc"] = {
        "w_observer": w_obs, "a_observer": a_obs, "act_range": Setting("str", ACT_RANGES), "k": Setting("k"),
        "stats_batch": Setting("int", optional=True, minimum=1), "rounding": Setting("str", MODES),
        "bias_correction": flag, "bc_act": flag, "udfc_act_noise": flag, "udfc_out_noise": flag, "udfc_clip": flag,
        "udfc_cov": Setting("str", COV_MODES), "udfc_fit": Setting("str", FITS), "threads": threads}
    table["pre:dfq"] = {"cle": flag, "cle_iters": Setting("int", minimum=0), "absorb": flag,
                        "absorb_sigma": Setting("float"), "absorb_padded": flag, "relu6": Setting("str", RELU6_MODES),
                        "threads": threads}

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
