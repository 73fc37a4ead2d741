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
#: typed defaults of a quantizer's hparams: a ``--set`` string is converted to the default's type (or refused
#: with a one-line error) before anything runs
HPARAM_DEFAULTS: dict[str, dict[str, Any]] = {}


HPARAM_DEFAULTS["calib"] = {"w_observer": "minmax", "a_observer": "minmax", "calib_batch": 256, "sequential": False}
HPARAM_KEYS["calib"] = frozenset(HPARAM_DEFAULTS["calib"])


@QUANTIZERS.register("calib")
def quant_calib(ctx: QuantContext) -> nn.Module:
    """Range calibration only: weights from ``w_observer`` (per the protocol's granularity),
    activation ranges from ``a_observer`` over the calibration images. No learning."""
    from .ptq.calibrate import calibrate
    from .quant.protocol import apply_protocol

    h = {**HPARAM_DEFAULTS["calib"], **ctx.hparams}
    q = apply_protocol(ctx.model, ctx.protocol, ctx.w_bits, ctx.a_bits, policy=ctx.policy,
                       w_observer=h["w_observer"], a_observer=h["a_observer"], strict=ctx.strict)
    if ctx.images is None:
        raise BadValueError("the calib quantizer needs calibration images (a synthesizer, --synthetic or --calib)")
    return calibrate(q, ctx.images, observer=h["a_observer"], batch_size=int(h["calib_batch"]),
                     sequential=bool(h["sequential"]))


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
#: ZeroQ's calibration budgets (quantizer side; see the zeroq recipe), shared by the recipes calibrating as it does
_ZEROQ_BUDGETS = {"smoke": {"quant": {"w_observer": "mse"}}, "default": {"quant": {"w_observer": "mse"}}}

_add(Recipe(
    name="zeroq", family="noise-optimization", kind="PTQ",
    paper="ZeroQ: A Novel Zero Shot Quantization Framework (Cai et al., CVPR 2020)",
    protocol="qat", synth="zeroq", quant="calib",
    hparams={"w_observer": "minmax", "a_observer": "minmax"},
    # synthesizer: the zeroq synthesizer's own smoke/default/paper presets. Quantizer: `paper` is the
    # official min-max weights; `default`/`smoke` search each weight channel's range (L_p, p = 2.4),
    # chosen on a validation split (first 5,000 images of cifar10-jpeg/train.tar, ResNet-20, `ptq`,
    # seed 0): W4A8 83.30 -> 84.66, W4A4 80.30 -> 82.32; min-max activations kept (L_p activations
    # +0.1/+0.2 there, not worth leaving the paper's activation ranges).
    budgets=_ZEROQ_BUDGETS,
    doc=("Distilled data by per-image BN-statistics matching (Adam lr 0.5, 500 iterations, batch 32), "
         "then per-channel min-max weights and running min-max activation ranges "
         "[code: amirgholami/ZeroQ]. Native protocol = the official code's placement (every layer "
         "quantized, activations after every ReLU, BN unfolded), i.e. zsq's `qat` layout. Budget "
         "`paper` is the official run (32 images x 500 iterations, min-max weights); `default` (256 "
         "images x 120 iterations, bf16) also searches each weight channel's range by L_p error "
         "(p = 2.4), chosen on a train.tar validation split (+1.4 / +2.0 points at W4A8 / W4A4)."),
))

# The other noise-optimization PTQ papers, calibrated as the zeroq recipe does (calib quantizer, its budgets).
# Their synthesizers' default presets make 5,120 images (sized for QAT); the default budget here takes
# 256, zeroq's default calibration set, so the PTQ rows share one calibration budget. (mixmix: after brecq.)
_ZEROQ_BUDGETS_256 = {**_ZEROQ_BUDGETS, "default": {"n_images": 256, **_ZEROQ_BUDGETS["default"]}}
_add(Recipe(
    name="dsg", family="noise-optimization", kind="PTQ",
    paper="DSG: Diversifying Sample Generation for Accurate Data-Free Quantization (Zhang et al., CVPR 2021)",
    protocol="qat", synth="dsg", quant="calib",
    hparams={"w_observer": "minmax", "a_observer": "minmax"},
    budgets=_ZEROQ_BUDGETS_256,
    doc=("ZeroQ's loop with DSG's slack BN-statistics alignment and layerwise sample enhancement (no public code; "
         "details unverified), then ZeroQ's calibration: per-channel weights, running min-max activation ranges. "
         "Native protocol = zeroq's (DSG builds on ZeroQ's code and quantization: zsq's `qat` layout). `paper`: "
         "1,024 images, min-max weights; `default`: 256 images, L_p weight ranges as zeroq."),
))
_add(Recipe(
    name="kw", family="noise-optimization", kind="PTQ",
    paper="The Knowledge Within: Methods for Data-Free Model Compression (Haroush et al., CVPR 2020)",
    protocol="ptq", synth="kw", quant="calib",
    hparams={"w_observer": "minmax", "a_observer": "minmax"},
    budgets=_ZEROQ_BUDGETS_256,
    doc=("BN-statistics data (batch mean / std, L2) + CE to target labels (no public code; details unverified), "
         "calibrated as zeroq: per-channel weights, min-max activation ranges (KW's BN re-estimation and KD are left "
         "out). Protocol `ptq` (the survey marks KW's setting as not GDFQ's; zsq's BRECQ-style layout). "
         "`paper`: 1,024 images; `default`: 256 images, L_p weight ranges as zeroq."),
))


# -- block reconstruction (issue 5): AdaRound, BRECQ, QDrop, Genie-M; the genie / brecq / qdrop recipes --------

def _reconstruction_quantizer(method: str, doc: str,
                              extra_keys: tuple[str, ...] = ()) -> Callable[[QuantContext], nn.Module]:
    def run(ctx: QuantContext) -> nn.Module:
        from .ptq.reconstruct import quantize_reconstruct

        return quantize_reconstruct(ctx, method)

    import dataclasses

    from .ptq.reconstruct import ENGINE_HPARAMS, ReconConfig

    HPARAM_DEFAULTS[method] = {**{f.name: f.default for f in dataclasses.fields(ReconConfig)}, **ENGINE_HPARAMS}
    # extra_keys: hparams only this method's passes read (BRECQ's activation pass: lr_a, iters_a); the others
    # refuse them (a `--set lr_a=0` on genie used to be accepted and silently ignored)
    HPARAM_KEYS[method] = frozenset(HPARAM_DEFAULTS[method]) | {"w_observer", "a_observer", "stop_at", *extra_keys}
    run.__name__ = f"quant_{method.replace('-', '_')}"
    run.__doc__ = doc
    return QUANTIZERS.add(method, run)


_reconstruction_quantizer("adaround", (
    "AdaRound (Nagel et al., ICML 2020), layer by layer: learnt rounding (rectified sigmoid, regulariser "
    "weight 0.01, beta 20->2 after 20% warm-up, Adam 1e-3), fixed per-channel L_p steps, quantized inputs; "
    "activation ranges by sequential L_p search afterwards. hparams: ReconConfig fields (iters, batch_size ...)."))
_reconstruction_quantizer("brecq", (
    "BRECQ (Li et al., ICLR 2021) [code: yhhhli/BRECQ]: block by block, stage 1 AdaRound weights (act quant "
    "off, weight 0.01, iters per block), stage 2 LSQ activation steps (iters_a = 5000, lr_a = 4e-4); inputs "
    "from the quantized model; plain output MSE (no Fisher: no labels)."), extra_keys=("lr_a", "iters_a"))
_reconstruction_quantizer("qdrop", (
    "QDrop (Wei et al., ICLR 2022) [code: wimh966/QDrop]: block by block, AdaRound weights (weight 0.01, Adam 1e-3) "
    "and LSQ activation steps (lr 4e-5, cosine) jointly, with the block input an elementwise 50/50 mix of FP "
    "and quantized inputs and every activation quantizer dropping quantization with probability 0.5."))
_reconstruction_quantizer("genie-m", (
    "Genie-M (Jeon et al., CVPR 2023) [code: SamsungLabs/Genie reconstruct.py]: QDrop's block reconstruction "
    "plus the weight step learnt jointly with the rounding (Adam 1e-4, cosine; floor fixed at the initial step), "
    "rounding loss weight 1.0, activation steps lr 4e-5, rounding lr 1e-3."))

# Budgets of the reconstruction recipes (quantizer side; the synthesizer's own presets size the data):
#   paper   = the papers' defaults: 20,000 steps per block, batch 32 (Genie-D: 1,024 images x 4,000 iters)
#   default = sized for 2 CPU cores: synthesis + the first bit setting of ResNet-20 within 800 s:
#             3,000 steps per block of batch 8, fp32. Batch 8 is what the official Genie code
#             actually runs on 256 images (its sampler is randperm(N).view(32, -1): N / 32 images
#             per step); at batch 32 a step costs ~25 ms instead of ~15 ms here and ResNet-20's 11
#             units alone take ~700 s. Validation split (bench/genie_validation.py), W3A3: batch 8 x
#             3,000 steps 81.86 vs 81.42 at 1,000 steps. bf16 / channels_last measured at batch 8:
#             < 1.2x faster (13-16 vs 15-17 ms per step), so fp32.
#   smoke   = seconds, for CI
_RECON_BUDGETS = {
    "smoke": {"quant": {"iters": 20, "batch_size": 16}},
    "default": {"quant": {"iters": 3000, "batch_size": 8, "precision": "fp32"}},
    "paper": {"quant": {"iters": 20000}},
}

_add(Recipe(
    name="genie", family="noise-optimization", kind="PTQ",
    paper="Genie: Show Me the Data for Quantization (Jeon, Lee, Kim; CVPR 2023)",
    protocol="genie-native", synth="genie", quant="genie-m",
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets=_RECON_BUDGETS,
    doc=("Genie-D data (a fresh generator + latents per batch of 128, Genie's BNS loss with swing convolution; "
         "1,024 images x 4,000 iterations in the paper) and Genie-M reconstruction (QDrop + AdaRound + learnt "
         "weight steps, 20,000 steps per block) [code: SamsungLabs/Genie]. Native protocol = the official code's "
         "convention (genie-native: BN unfolded, quantizers at layer inputs, shortcuts quantized); publish `ptq` "
         "numbers beside it. default budget: 256 images x 300 iterations (bf16, compressed schedules), 3,000 steps per "
         "block of batch 8 (fp32; the official code's effective batch for 256 images)."),
))
_add(Recipe(
    name="sadag", family="noise-optimization", kind="PTQ",
    paper="Sharpness-Aware Data Generation for Zero-shot Quantization (Hoang-Anh, Pham, Le, Cai, Do; ICML 2024)",
    protocol="genie-native", synth="sadag", quant="genie-m",
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets=_RECON_BUDGETS,
    doc=("Genie-D data plus SADAG's gradient-matching term (cosine between each image's and its Gaussian "
         "neighbours' per-sample gradients of the FP-vs-W4A4 reconstruction loss w.r.t. the last block's "
         "weights, second order into the generator), then Genie-M reconstruction as in the genie recipe. No "
         "public code: neighbours, rho, weight and schedule are zsq's choices (zsq.synth.sadag). default "
         "budget: Genie-D's default with the term (weight 0.03, chosen on a validation split) every 8th iteration from "
         "25% on, 3,000 steps per block."),
))
_add(Recipe(
    name="brecq", family="reconstruction", kind="PTQ",
    paper="BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction (Li et al., ICLR 2021)",
    protocol="ptq", synth="genie", quant="brecq",
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets={**_RECON_BUDGETS, "smoke": {"quant": {"iters": 20, "batch_size": 16, "iters_a": 10}},
             "default": {"quant": {"iters": 2000, "iters_a": 500, "precision": "fp32"}}},
    doc=("BRECQ's sequential block reconstruction (weights, then activation steps) on zero-shot data. The "
         "synthesizer is Genie-D (the Genie paper's zero-shot BRECQ baseline uses distilled data; Genie-D is the "
         "strongest BNS synthesizer here); override with --synth. paper: 20,000 + 5,000 steps per block."),
))
_add(Recipe(
    name="mixmix", family="noise-optimization", kind="PTQ",
    paper="MixMix: All You Need for Data-Free Compression Are Feature and Data Mixing (Li et al., ICCV 2021)",
    protocol="ptq", synth="mixmix", quant="brecq",
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets={**RECIPES["brecq"].budgets, "default": {"n_images": 256, **RECIPES["brecq"].budgets["default"]}},
    doc=("MixMix's data (feature mixing: BN statistics of several models; data mixing: CutMix of synthesized images "
         "with mixed labels; no public code, details unverified) reconstructed with BRECQ as in the paper (first / "
         "last layer 8-bit, `ptq`). Budgets: the brecq recipe's; `paper` 1,024 images, `default` 256 (genie's)."),
))
_add(Recipe(
    name="qdrop", family="reconstruction", kind="PTQ",
    paper="QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization (Wei et al., ICLR 2022)",
    protocol="ptq", synth="genie", quant="qdrop",
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets=_RECON_BUDGETS,
    doc=("QDrop's joint block reconstruction with random quantization dropping on Genie-D data (override with "
         "--synth). paper: 20,000 steps per block, batch 32, 1,024 images."),
))

from .synth import genie as _genie  # noqa: E402,F401  (registers the "genie" synthesizer)
from .synth import sadag as _sadag  # noqa: E402,F401  (registers the "sadag" synthesizer)
from .ptq import datafree as _datafree  # noqa: E402,F401  (registers dfq / squant / udfc)
from .qat import recipes as _qat  # noqa: E402,F401  (registers qat-kd / qat-zeroq)
from .gen import recipes as _gen  # noqa: E402,F401  (registers the generator-based QAT recipes: gdfq, qimera, ait ...)
from . import vit_recipes as _vit  # noqa: E402,F401  (registers psaq-vit / psaq-vit-v2 / smi / clamp-vit, calib-sparse)
