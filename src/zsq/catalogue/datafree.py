"""Synthesis-free recipes (issue 7): DFQ, SQuant and UDFC, no synthetic data (``synth=None``), native protocol
``fixed``; the quantizers and the ``dfq`` pre-step are :mod:`zsq.ptq.datafree`'s, whose docstring describes
the shared skeleton and every hparam.

Every entry has the same shape (:func:`zsq.recipes.recipe`); there is nothing to budget (no data, no
iterations), so ``budgets`` is empty.
"""

from __future__ import annotations

from ..ptq.datafree import COMMON_HPARAMS  # registers the dfq pre-step and the dfq / squant / udfc quantizers
from ..recipes import recipe

DFQ_PAPER = "Data-Free Quantization through Weight Equalization and Bias Correction (Nagel et al., ICCV 2019)"
SQUANT_PAPER = "SQuant: On-the-Fly Data-Free Quantization via Diagonal Hessian Approximation (Guo et al., ICLR 2022)"
UDFC_PAPER = "Unified Data-Free Compression: Pruning and Quantization without Fine-Tuning (Bai et al., ICCV 2023)"

recipe(
    "dfq", family="synthesis-free", kind="PTQ", protocol="fixed", pre="dfq", synth=None, quant="dfq",
    paper=DFQ_PAPER,
    hparams={**COMMON_HPARAMS, "rounding": "nearest", "bias_correction": True, "bc_act": False,
             "cle": True, "absorb": True, "absorb_sigma": 3.0, "absorb_padded": False, "relu6": "skip"},
    doc=("BN folding, cross-layer equalization iterated over every conv/linear pair joined by a ReLU "
         "(depthwise-separable pairs included; ReLU6 stops a pair unless relu6='replace', the paper's "
         "ReLU6 -> ReLU swap, which costs EfficientNet-Lite0 15 points before quantization), high-bias "
         "absorption (3 sigma), activation ranges beta +- k gamma from the BN statistics, round-to-nearest "
         "per-channel weights, analytic bias correction with the clipped-normal expected input. No data, "
         "no synthesis. The paper uses per-tensor weights; the `fixed` protocol quantizes weights per channel."),
)

recipe(
    "squant", family="synthesis-free", kind="PTQ", protocol="fixed", synth=None, quant="squant",
    paper=SQUANT_PAPER,
    hparams={**COMMON_HPARAMS, "rounding": "squant", "bias_correction": False, "bc_act": False},
    doc=("SQuant's data-free rounding from the diagonal-Hessian approximation: round-to-nearest, then "
         "kernel-wise and channel-wise error-sum flips (CASE), per-channel min-max weights [code: "
         "clevercool/SQuant]. Activation ranges from the BN statistics (the official code uses s * std of "
         "one forward of uniform noise; its README calls that a DFQ-style BN range with a wider clip)."),
)

recipe(
    "udfc", family="synthesis-free", kind="PTQ", protocol="fixed", synth=None, quant="udfc",
    paper=UDFC_PAPER,
    hparams={**COMMON_HPARAMS, "rounding": "nearest", "bias_correction": True, "bc_act": True, "udfc_fit": "mse",
             "udfc_cov": "noise", "udfc_clip": True, "udfc_act_noise": False, "udfc_out_noise": False},
    doc=("Each layer's weight quantization error compensated through the next "
         "layer: closed-form per-channel rescaling of the next layer's input channels plus a bias, "
         "minimising its expected reconstruction error under the BN Gaussian model (our derivation, see "
         "zsq.ptq.udfc; the authors' code is unavailable). Activation ranges from the BN statistics."),
)
