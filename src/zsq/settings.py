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
import difflib
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import BadValueError

KINDS = ("bool", "int", "float", "str", "floats", "ints", "k")


@dataclass(frozen=True)
class Setting:
    """One setting. ``kind``: ``bool`` | ``int`` | ``float`` | ``str`` (one of ``choices``) | ``floats`` /
    ``ints`` (a list of numbers; ``length`` of them when set) | ``k`` (a number, or a table bits -> number);
    ``optional``: ``null`` / ``None`` allowed (the quantizer picks); ``minimum``: the smallest number allowed."""

    kind: str
    choices: tuple[str, ...] = ()
    optional: bool = False
    minimum: float | None = None
    length: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS or (self.kind == "str") != bool(self.choices):
            raise ValueError(f"bad setting declaration: {self}")

    def describe(self) -> str:
        """What the setting takes, in words (error messages, ``zsq methods R``)."""
        d = {"bool": "true or false", "int": "an integer", "float": "a number", "str": " | ".join(self.choices),
             "k": "a number or a table {bits: number}"}.get(self.kind)
        if d is None:
            what = "integers" if self.kind == "ints" else "numbers"
            d = f"a list of {self.length} {what}" if self.length else f"a list of {what}"
        if self.minimum is not None:
            d += f" >= {self.minimum:g}"
        return d + (" or null" if self.optional else "")

    def short(self) -> str:
        """The same, compact (``zsq methods R``): ``true|false``, ``int>=1``, ``minmax|percentile|mse`` ..."""
        d = {"bool": "true|false", "int": "int", "float": "number", "str": "|".join(self.choices),
             "k": "number|{bits:number}"}.get(self.kind)
        if d is None:
            item = "int" if self.kind == "ints" else "number"
            d = f"[{', '.join([item] * self.length)}]" if self.length else f"[{item}, ...]"
        if self.minimum is not None:
            d += f">={self.minimum:g}"
        return d + ("|null" if self.optional else "")

    def check(self, name: str, value: Any) -> Any:
        """``value`` in the declared type (strings from the command line converted), or a BadValueError."""
        if value is None:
            if self.optional:
                return None
            raise BadValueError(f"setting {name} expects {self.describe()}, got null")
        if self.kind == "str":
            return _choice(name, value, self.choices)
        if self.kind == "bool":
            return _bool(name, value)
        if self.kind in ("int", "float"):
            return self._number(name, value, self.kind)
        if self.kind == "k":
            if isinstance(value, dict):
                return {b: self._table_entry(name, b, v) for b, v in value.items()}
            return self._number(name, value, "float", kind_words="a number or a table {bits: number}")
        return self._list(name, value)

    # -- the kinds ---------------------------------------------------------------------------------
    def _number(self, name: str, value: Any, kind: str, kind_words: str | None = None) -> int | float:
        words = kind_words or ("an integer" if kind == "int" else "a number")
        v = value
        if isinstance(value, str):  # a --set string that JSON did not read as a number (or an API string)
            try:
                v = int(value) if kind == "int" else float(value)
            except ValueError:
                raise BadValueError(f"setting {name} expects {words}, got '{value}'") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadValueError(f"setting {name} expects {words}, got {_show(value)}")
        if isinstance(v, float) and math.isnan(v):
            raise BadValueError(f"setting {name} expects {words}, got nan")
        if kind == "int" and isinstance(v, float):
            if not v.is_integer():
                raise BadValueError(f"setting {name} expects an integer, got {_show(value)}")
            v = int(v)
        if self.minimum is not None and v < self.minimum:
            raise BadValueError(f"setting {name} must be >= {self.minimum:g}, got {_show(value)}")
        return v

    def _table_entry(self, name: str, bits: Any, v: Any) -> Any:
        try:
            int(bits)
        except (TypeError, ValueError):
            raise BadValueError(f"setting {name} expects a table {{bits: number}}, got the key {_show(bits)}") from None
        return self._number(f"{name}[{bits}]", v, "float")

    def _list(self, name: str, value: Any) -> list | tuple:
        kind = "int" if self.kind == "ints" else "float"
        if isinstance(value, str) or not isinstance(value, (list, tuple)) \
                or (self.length is not None and len(value) != self.length):
            form = ", ".join("abcdefgh"[:self.length]) if self.length else "a, b, ..."
            raise BadValueError(f"setting {name} expects {self.describe()}, written [{form}], got {_show(value)}")
        out = [self._number(name, v, kind, kind_words=self.describe()) for v in value]
        return type(value)(out) if out != list(value) else value


def _show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else repr(value)


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadValueError(f"setting {name} expects true or false, got {_show(value)}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    msg = f"setting {name} must be one of {', '.join(choices)}, got {_show(value)}"
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(lowered), n=3, cutoff=0.5)
    if close:
        msg += f": did you mean {', '.join(lowered[c] for c in close)}?"
    raise BadValueError(msg)


# -------------------------------------------------------------------------------------------------
# the declarations
# -------------------------------------------------------------------------------------------------
def _from_config(cls: type, choices: dict[str, tuple[str, ...]], minimum: dict[str, float],
                 keys: Iterable[str] | None = None) -> dict[str, Setting]:
    """The settings of a config dataclass's fields (or of ``keys`` among them): the type from each field's
    annotation, the allowed strings from ``choices``, lower bounds from ``minimum``."""
    hints = typing.get_type_hints(cls)
    keys = set(keys) if keys is not None else None
    out = {}
    for f in dataclasses.fields(cls):
        if keys is not None and f.name not in keys:
            continue
        t = hints[f.name]
        if t in (bool, int, float):
            kind, length = t.__name__, None
        elif t is str:
            kind, length = "str", None
        elif typing.get_origin(t) is tuple:
            args = typing.get_args(t)
            kind = "ints" if args[0] is int else "floats"
            length = None if (len(args) == 2 and args[1] is Ellipsis) else len(args)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no setting kind for {t}")
        out[f.name] = Setting(kind, choices=choices.get(f.name, ()), minimum=minimum.get(f.name), length=length)
    return out


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
    recon = {**_from_config(reconstruct.ReconConfig,
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
    table["qat-kd"] = {**_from_config(engine.QATConfig, qat_choices, counts),
                       "stop_at": Setting("ints", optional=True, length=2)}
    loop = _from_config(GenConfig, qat_choices, counts, keys=LOOP_KEYS)
    for name, game in GAME_OF.items():
        game_min = {f.name: 0 for f in dataclasses.fields(GAMES[game])} | {"latent_dim": 1, "g_steps": 1, "s_steps": 1}
        table[name] = {**loop, **_from_config(GAMES[game], qat_choices, game_min),
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
