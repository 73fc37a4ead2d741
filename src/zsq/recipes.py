"""The recipe registry: what a recipe is (:class:`Recipe`), what a quantizer receives
(:class:`QuantContext`), the registries of recipes, quantizers (``--quant``) and pre-steps (``--pre``),
and :func:`recipe`, the one way a recipe is declared.

This module registers nothing and imports nothing that does (as timm's ``_registry.py``): the
quantizers and pre-steps register themselves from the modules that implement them
(:mod:`zsq.ptq.quantizers`, :mod:`zsq.ptq.datafree`, :mod:`zsq.qat.quantizer`, :mod:`zsq.gen.quantizers`,
:mod:`zsq.ptq.sparse`), and every recipe is declared in :mod:`zsq.catalogue`, one module per family;
``import zsq.catalogue`` (done by :mod:`zsq.api`) registers them all.

A quantizer is a function taking a :class:`QuantContext` and returning the quantized model; a
pre-step (a synthesis-free transform such as DFQ) takes the FP model and the hparams.
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .registry import Registry
from .spec import LayerPolicy, Protocol


@dataclass
class QuantContext:
    """Everything a quantizer may use. ``images`` are calibration images (synthetic or real);
    ``labels`` the synthesis labels aligned with them when the synthesizer made some (``None`` for
    real-data calibration and label-free synthesizers)."""

    model: nn.Module
    images: torch.Tensor | None
    protocol: Protocol
    w_bits: int
    a_bits: int
    policy: LayerPolicy
    hparams: dict[str, Any]
    budget: str = "default"
    seed: int = 0
    progress: bool = True
    ckpt_dir: Path | None = None
    resume: bool = False
    strict: bool = False
    labels: torch.Tensor | None = None


@dataclass
class Recipe:
    """A literature method. ``budgets`` maps smoke/default/paper to synthesizer overrides
    (``n_images`` and the synthesizer's own fields) and quantizer hparam overrides (``quant``)."""

    name: str
    family: str
    kind: str  # PTQ | QAT
    paper: str
    protocol: str
    synth: str | None
    quant: str
    pre: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)
    doc: str = ""

    def to_row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("doc")
        return d


QUANTIZERS: Registry[Callable[[QuantContext], nn.Module]] = Registry("quantizer")
PRE_STEPS: Registry[Callable[[nn.Module, dict], nn.Module]] = Registry("pre-step")
RECIPES: Registry[Recipe] = Registry("recipe")
#: hparam keys each quantizer (and, as ``pre:NAME``, each pre-step) reads: what ``--set KEY=VALUE``
#: may override besides the recipe's own hparams
HPARAM_KEYS: dict[str, frozenset[str]] = {}


def recipe(name: str, *, family: str, kind: str, paper: str, protocol: str, synth: str | None, quant: str,
           pre: str | None = None, hparams: dict[str, Any] | None = None,
           budgets: dict[str, dict[str, Any]] | None = None, doc: str = "") -> Recipe:
    """Declare and register one recipe: ``name`` runs ``pre`` (if any), synthesizer ``synth`` (``None``:
    no synthetic data, or a generator inside the quantizer), quantizer ``quant`` on ``protocol``, with the
    paper's ``hparams`` and per-budget overrides ``budgets`` (``{"smoke" | "default" | "paper": {synthesizer
    fields, "quant": {hparams}}}``). ``doc`` says what the method does and where each default comes from
    (``paper`` when empty)."""
    return RECIPES.add(name, Recipe(
        name=name, family=family, kind=kind, paper=paper, protocol=protocol, synth=synth, quant=quant, pre=pre,
        hparams={} if hparams is None else hparams, budgets={} if budgets is None else budgets, doc=doc or paper))
