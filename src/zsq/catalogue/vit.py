"""Vision-transformer recipes (issue 11): ``psaq-vit``, ``psaq-vit-v2``, ``smi``, ``clamp-vit``.

All four run on the ``vit-ptq`` protocol (PSAQ-ViT's quantizer placement, see :mod:`zsq.spec`) and
quantize as the official code does under the ``paper`` budget: weights per-channel min-max
(``QuantLinear``'s ``channel_wise`` weights), activations per-tensor running min/max from **one forward
pass** of the synthetic batch (zkkli/PSAQ-ViT ``test_quant.py`` + ``QuantAct``; Egg-Hu/SMI
``test_quant.py``, the same quantization code; CLAMP-ViT's released evaluator defaults to
``--quant-method minmax``). The ``default`` budget searches the activation ranges by MSE over the same
forward pass instead (chosen on the validation split, see ``VIT_DEFAULT_QUANT``).
The synthesizers (:mod:`zsq.synth.vit`) size the data per budget with their own presets; the
quantizer has nothing to budget (one forward pass), so ``budgets`` only name the presets.

``smi`` calibrates with ``calib-sparse`` (:mod:`zsq.ptq.sparse`): ``calib`` with SMI's kept-token forward.

Every entry has the same shape (:func:`zsq.recipes.recipe`): its synthesizer of the same name, ``vit-ptq``,
per-channel min-max weights and one forward pass of the synthetic batch for the activation ranges.
"""

from __future__ import annotations

from typing import Any

from ..ptq import quantizers as _quantizers  # noqa: F401  (registers calib)
from ..ptq import sparse as _sparse  # noqa: F401  (registers calib-sparse)
from ..recipes import recipe

#: activation ranges of the ``smoke`` / ``default`` budgets: per-tensor MSE search instead of the official
#: running min/max. Chosen on the validation split (``bench/vit_validation.py``, 5,000 held-out training
#: images): +6.4 to +8.6 top-1 at W4A4 for all four recipes, -0.2..+0.1 at W4A8. ``paper`` keeps min-max.
VIT_DEFAULT_QUANT = {"a_observer": "mse"}


def _budgets() -> dict[str, dict[str, Any]]:
    """The official running min/max under the ``paper`` budget, MSE-searched ranges (``VIT_DEFAULT_QUANT``) under
    ``default`` and ``smoke``; otherwise the budgets name the synthesizer's presets (the quantizer has nothing
    else to budget)."""
    return {"smoke": {"quant": dict(VIT_DEFAULT_QUANT)}, "default": {"quant": dict(VIT_DEFAULT_QUANT)}, "paper": {}}


recipe(
    "psaq-vit", family="noise-optimization", kind="PTQ", protocol="vit-ptq", synth="psaq-vit", quant="calib",
    paper="Patch Similarity Aware Data-Free Quantization for Vision Transformers (Li et al., ECCV 2022)",
    hparams={"w_observer": "minmax", "a_observer": "minmax"},
    budgets=_budgets(),
    doc=("One batch of 32 images optimised to maximise every block's patch-similarity entropy (KDE of the cosine "
         "similarities of attn@v's patch tokens) + CE to random labels + |TV - v|; Adam lr 0.2, two rounds of 500 "
         "cosine-lr iterations with growing jitter [code: zkkli/PSAQ-ViT generate_data.py]; min-max calibration "
         "with one forward pass [test_quant.py] (paper budget). default: 2 x 150 iterations, MSE activation ranges."),
)

recipe(
    "psaq-vit-v2", family="noise-optimization", kind="PTQ", protocol="vit-ptq", synth="psaq-vit-v2", quant="calib",
    paper=("PSAQ-ViT V2: Towards Accurate and General Data-Free Quantization for Vision Transformers "
           "(Li et al., TNNLS 2023)"),
    hparams={"w_observer": "minmax", "a_observer": "minmax"},
    budgets=_budgets(),
    doc=("PSAQ-ViT's patch-similarity synthesis without labels, plus hard samples: maximise KL(FP || student) "
         "against a W4A8 min-max student the synthesizer quantizes and re-calibrates itself (no public code; the "
         "paper's KD fine-tuning of the student is left out). Calibration as PSAQ-ViT. default: 2 x 100, MSE "
         "activation ranges."),
)

recipe(
    "smi", family="noise-optimization", kind="PTQ", protocol="vit-ptq", synth="smi", quant="calib-sparse",
    paper=("Sparse Model Inversion: Efficient Inversion of Vision Transformers for Data-Free Applications "
           "(Hu et al., ICML 2024)"),
    hparams={"w_observer": "minmax", "a_observer": "minmax"},
    budgets=_budgets(),
    doc=("DeepInversion-style CE + TV_l2 inversion (Adam lr 0.25, 4,000 iterations, batch 32) that stops inverting "
         "the 30% lowest-CLS-attention patches at iterations 50/100/200/300 (they are no longer fed forward); the "
         "final images keep only the foreground patches [code: Egg-Hu/SMI synthesis/smi.py]; min-max calibration "
         "with the kept-token forward [test_quant.py] (paper budget). default: 500 iterations, MSE activation "
         "ranges."),
)

recipe(
    "clamp-vit", family="noise-optimization", kind="PTQ", protocol="vit-ptq", synth="clamp-vit", quant="calib",
    paper=("CLAMP-ViT: Contrastive Data-Free Learning for Adaptive Post-Training Quantization of ViTs "
           "(Ramachandran et al., ECCV 2024)"),
    hparams={"w_observer": "minmax", "a_observer": "minmax"},
    budgets=_budgets(),
    doc=("PSAQ-ViT's loop with a patch-level contrastive loss (neighbouring patches on the grid, similar ones "
         "positive, InfoNCE tau 0.1; the official code has no data generation, details unverified); the paper's "
         "evolutionary search of the quantization parameters is not implemented: min-max calibration (the "
         "released evaluator's default; paper budget). default: 2 x 150 iterations, MSE activation ranges."),
)
