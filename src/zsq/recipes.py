"""Recipes: each literature method as one registered composition of (pre-step, synthesizer,
quantizer, native protocol, budgets, hyperparameters), with its paper defaults documented.

Quantizers (``--quant``) are registered in :data:`QUANTIZERS`: a function taking a
:class:`QuantContext` and returning the quantized model. Pre-steps (``--pre``, synthesis-free
transforms such as DFQ) are registered in :data:`PRE_STEPS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import BadValueError
from .registry import Registry
from .spec import LayerPolicy, Protocol


@dataclass
class QuantContext:
    """Everything a quantizer may use. ``images`` are calibration images (synthetic or real)."""

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


@QUANTIZERS.register("calib")
def quant_calib(ctx: QuantContext) -> nn.Module:
    """Range calibration only: weights from ``w_observer`` (per the protocol's granularity),
    activation ranges from ``a_observer`` over the calibration images. No learning."""
    from .ptq.calibrate import calibrate
    from .quant.protocol import apply_protocol

    h = ctx.hparams
    q = apply_protocol(ctx.model, ctx.protocol, ctx.w_bits, ctx.a_bits, policy=ctx.policy,
                       w_observer=h.get("w_observer", "minmax"), a_observer=h.get("a_observer", "minmax"),
                       strict=ctx.strict)
    if ctx.images is None:
        raise BadValueError("the calib quantizer needs calibration images (a synthesizer, --synthetic or --calib)")
    return calibrate(q, ctx.images, observer=h.get("a_observer", "minmax"),
                     batch_size=int(h.get("calib_batch", 256)), sequential=bool(h.get("sequential", False)))


def _add(r: Recipe) -> Recipe:
    if r.doc == "":
        r.doc = r.paper
    return RECIPES.add(r.name, r)


_add(Recipe(
    name="minmax-noise", family="baseline", kind="PTQ", paper="(baseline) Gaussian-noise calibration",
    protocol="fixed", synth="gaussian", quant="calib",
    hparams={"w_observer": "minmax", "a_observer": "minmax"},
    budgets={"smoke": {"n_images": 64}, "default": {"n_images": 256}, "paper": {"n_images": 256}},
    doc="Weights per-channel min-max; activation min-max over 256 N(0,1) images (benchmarks.md's noise row).",
))
_add(Recipe(
    name="zeroq", family="noise-optimization", kind="PTQ",
    paper="ZeroQ: A Novel Zero Shot Quantization Framework (Cai et al., CVPR 2020)",
    protocol="qat", synth="zeroq", quant="calib",
    hparams={"w_observer": "minmax", "a_observer": "minmax"},
    budgets={},  # the zeroq synthesizer's own smoke/default/paper presets
    doc=("Distilled data by per-image BN-statistics matching (Adam lr 0.5, 500 iterations, batch 32), "
         "then per-channel min-max weights and running min-max activation ranges "
         "[code: amirgholami/ZeroQ]. Native protocol = the official code's placement (every layer "
         "quantized, activations after every ReLU, BN unfolded), i.e. zsq's `qat` layout."),
))
