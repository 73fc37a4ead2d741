"""Typed settings, written once: the one converter from a command-line string or a JSON value to a
setting's declared type, the declaration of one setting (:class:`Setting`), and :class:`Config`, the base
of the config dataclasses (one per quantizer and per synthesizer).

* the converters (:func:`to_bool`, :func:`to_int`, :func:`to_float`, :func:`to_choice`): ``"false"`` ->
  ``False``, ``"64"`` -> ``64``; a value of the wrong type, or outside its choices, is a one-line
  :class:`~zsq.errors.BadValueError` naming the setting (``setting K expects ...``; a choice lists the
  choices and suggests the closest). Booleans: ``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case),
  ``True``/``False``, ``1``/``0``; nothing else.
* :class:`Setting`: what one key takes (kind, choices, minimum, null allowed); :func:`settings_of` reads
  them from a config dataclass: the type from each field's annotation, choices and minimum from the
  field's metadata (:func:`setting`) or from tables the caller gives.
* :class:`Config`: ``from_dict`` (unknown key: ``X has no setting 'k': did you mean ...?``; each value
  through its :class:`Setting`), ``from_hparams`` (only this config's keys of a recipe's hparams),
  ``to_dict`` (JSON-ready: tuples as lists).

``--set``, ``--synth-set``, ``zsq.quantize(hparams=...)``, zsq.json and the bench all convert here
(:mod:`zsq.settings` builds the per-quantizer table from the configs). Cross-field rules (e.g. enough
steps after a warm-up) stay in the configs' ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import BadValueError

KINDS = ("bool", "int", "float", "str", "floats", "ints", "k")
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


# -------------------------------------------------------------------------------------------------
# the converters
# -------------------------------------------------------------------------------------------------
def show(value: Any) -> str:
    """A value as error messages quote it: strings in single quotes, the rest as repr."""
    return f"'{value}'" if isinstance(value, str) else repr(value)


def to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in TRUE + FALSE:
        return value.lower() in TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadValueError(f"setting {name} expects true or false, got {show(value)}")


def to_number(value: Any, name: str, kind: str = "float", *, minimum: float | None = None, finite: bool = False,
              words: str | None = None) -> int | float:
    """``value`` as an int (``kind="int"``: a float only when whole) or a number (an int stays an int, as
    JSON gave it); never a bool or nan; ``finite`` also refuses infinities."""
    words = words or ("an integer" if kind == "int" else "a number")
    v = value
    if isinstance(value, str):  # a --set string that JSON did not read as a number (or an API string)
        try:
            v = int(value) if kind == "int" else float(value)
        except ValueError:
            raise BadValueError(f"setting {name} expects {words}, got '{value}'") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadValueError(f"setting {name} expects {words}, got {show(value)}")
    if isinstance(v, float) and math.isnan(v):
        raise BadValueError(f"setting {name} expects {words}, got nan")
    if finite and isinstance(v, float) and math.isinf(v):
        raise BadValueError(f"setting {name} must be finite, got {show(value)}")
    if kind == "int" and isinstance(v, float):
        if not v.is_integer():
            raise BadValueError(f"setting {name} expects an integer, got {show(value)}")
        v = int(v)
    if minimum is not None and v < minimum:
        raise BadValueError(f"setting {name} must be >= {minimum:g}, got {show(value)}")
    return v


def to_int(value: Any, name: str, *, minimum: float | None = None) -> int:
    return to_number(value, name, "int", minimum=minimum)


def to_float(value: Any, name: str, *, minimum: float | None = None, finite: bool = False) -> float:
    """``value`` as a float (``to_number`` keeps an int an int; this one does not)."""
    return float(to_number(value, name, "float", minimum=minimum, finite=finite))


def to_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if isinstance(value, str) and value in choices:
        return value
    msg = f"setting {name} must be one of {', '.join(choices)}, got {show(value)}"
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(lowered), n=3, cutoff=0.5)
    if close:
        msg += f": did you mean {', '.join(lowered[c] for c in close)}?"
    raise BadValueError(msg)


# -------------------------------------------------------------------------------------------------
# one setting
# -------------------------------------------------------------------------------------------------
#: kind -> (long words, compact form) for the kinds that are one word
_WORDS = {"bool": ("true or false", "true|false"), "int": ("an integer", "int"), "float": ("a number", "number"),
          "k": ("a number or a table {bits: number}", "number|{bits:number}")}


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

    def _render(self, compact: bool) -> str:
        if self.kind == "str":
            d = ("|" if compact else " | ").join(self.choices)
        elif self.kind in _WORDS:
            d = _WORDS[self.kind][compact]
        elif compact:
            item = "int" if self.kind == "ints" else "number"
            d = f"[{', '.join([item] * self.length)}]" if self.length else f"[{item}, ...]"
        else:
            what = "integers" if self.kind == "ints" else "numbers"
            d = f"a list of {self.length} {what}" if self.length else f"a list of {what}"
        if self.minimum is not None:
            d += (">=" if compact else " >= ") + f"{self.minimum:g}"
        return d + (("|null" if compact else " or null") if self.optional else "")

    def describe(self) -> str:
        """What the setting takes, in words (error messages): ``true or false``, ``an integer >= 1`` ..."""
        return self._render(compact=False)

    def short(self) -> str:
        """The same, compact (``zsq methods R``): ``true|false``, ``int>=1``, ``minmax|percentile|mse`` ..."""
        return self._render(compact=True)

    def check(self, name: str, value: Any) -> Any:
        """``value`` in the declared type (strings from the command line converted), or a BadValueError.
        Numbers of the right type come back unchanged (an int given for a float stays an int)."""
        if value is None:
            if self.optional:
                return None
            raise BadValueError(f"setting {name} expects {self.describe()}, got null")
        if self.kind == "str":
            return to_choice(value, name, self.choices)
        if self.kind == "bool":
            return to_bool(value, name)
        if self.kind in ("int", "float"):
            return to_number(value, name, self.kind, minimum=self.minimum)
        if self.kind == "k":
            if isinstance(value, dict):
                return {b: self._table_entry(name, b, v) for b, v in value.items()}
            return to_number(value, name, words=self.describe())
        return self._list(name, value)

    def _table_entry(self, name: str, bits: Any, v: Any) -> Any:
        try:
            int(bits)
        except (TypeError, ValueError):
            raise BadValueError(f"setting {name} expects a table {{bits: number}}, got the key {show(bits)}") from None
        return to_number(v, f"{name}[{bits}]")

    def _list(self, name: str, value: Any) -> list | tuple:
        kind = "int" if self.kind == "ints" else "float"
        if isinstance(value, str) or not isinstance(value, (list, tuple)) \
                or (self.length is not None and len(value) != self.length):
            form = ", ".join("abcdefgh"[:self.length]) if self.length else "a, b, ..."
            raise BadValueError(f"setting {name} expects {self.describe()}, written [{form}], got {show(value)}")
        out = [to_number(v, name, kind, minimum=self.minimum, words=self.describe()) for v in value]
        return type(value)(out) if out != list(value) else value


# -------------------------------------------------------------------------------------------------
# config dataclasses
# -------------------------------------------------------------------------------------------------
def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, choices: Iterable[str] = (),
            minimum: float | None = None, **metadata: Any) -> Any:
    """A config field with its allowed strings (``choices``) and lower bound (``minimum``) beside its type
    and default: ``w_observer: str = setting("minmax", choices=WEIGHT_OBSERVERS)``."""
    meta = {**metadata, "choices": tuple(choices), "minimum": minimum}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def _kind(t: Any) -> tuple[str, int | None, bool]:
    """(kind, length, optional) of a field annotation."""
    args = typing.get_args(t)
    if type(None) in args:  # X | None
        kind, length, _ = _kind(next(a for a in args if a is not type(None)) if len(args) == 2
                                else typing.Union[tuple(a for a in args if a is not type(None))])
        return kind, length, True
    if t in (bool, int, float, str):
        return t.__name__, None, False
    if typing.get_origin(t) in (tuple, list):
        length = None if (len(args) == 2 and args[1] is Ellipsis) or typing.get_origin(t) is list else len(args)
        return ("ints" if args[0] is int else "floats"), length, False
    if set(args) == {float, dict[int, float]}:  # a number, or a table bits -> number
        return "k", None, False
    raise TypeError(f"no setting kind for {t}")


def settings_of(cls: type, choices: dict[str, tuple[str, ...]] | None = None,
                minimum: dict[str, float] | None = None, keys: Iterable[str] | None = None) -> dict[str, Setting]:
    """The settings of a config dataclass's fields (or of ``keys`` among them): the kind from each field's
    annotation, the allowed strings and the lower bound from its metadata (:func:`setting`), else from
    ``choices`` / ``minimum``."""
    hints = typing.get_type_hints(cls)
    keys = set(keys) if keys is not None else None
    choices, minimum = choices or {}, minimum or {}
    out = {}
    for f in dataclasses.fields(cls):
        if keys is not None and f.name not in keys:
            continue
        try:
            kind, length, optional = _kind(hints[f.name])
        except TypeError as e:
            raise TypeError(f"{cls.__name__}.{f.name}: {e}") from None
        low = f.metadata.get("minimum")
        out[f.name] = Setting(kind, choices=f.metadata.get("choices") or choices.get(f.name, ()), optional=optional,
                              minimum=low if low is not None else minimum.get(f.name), length=length)
    return out


class Config:
    """Base of the config dataclasses: ``from_dict`` / ``from_hparams`` / ``to_dict``, every value through
    the field's :class:`Setting` (declared by the field's annotation and :func:`setting` metadata)."""

    _settings: ClassVar[dict[type, dict[str, Setting]]] = {}

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """{field: Setting} of this config (built once per class)."""
        if cls not in Config._settings:
            Config._settings[cls] = settings_of(cls)
        return Config._settings[cls]

    @classmethod
    def check_dict(cls, d: dict[str, Any]) -> dict[str, Any]:
        """``d`` with each value converted to its field's type; an unknown key is a one-line error."""
        decl = cls.settings()
        for k in d:
            if k not in decl:
                close = difflib.get_close_matches(k, list(decl), n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}?" if close else f"choose from: {', '.join(decl)}"
                raise BadValueError(f"{cls.__name__} has no setting '{k}': {hint}")
        return {k: decl[k].check(k, v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None = None):
        """The config with the values of ``d`` (every key must be a field; a number of a ``float`` field
        becomes a float, a table's bits ints), the defaults elsewhere."""
        decl = cls.settings()

        def typed(k: str, v: Any) -> Any:
            if decl[k].kind == "float" and v is not None:
                return float(v)
            if decl[k].kind == "k" and isinstance(v, dict):  # JSON's keys are strings: bits as ints
                return {int(b): x for b, x in v.items()}
            return v

        return cls(**{k: typed(k, v) for k, v in cls.check_dict(dict(d or {})).items()})

    @classmethod
    def from_hparams(cls, hp: dict[str, Any] | None):
        """The config from a recipe's hparams: the keys that are fields (others belong to a pre-step or
        another part of the run)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in (hp or {}).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, tuples as lists."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}
