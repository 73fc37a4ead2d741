"""Vision-transformer recipes (issue 11): ``psaq-vit``, ``psaq-vit-v2``, ``smi``, ``clamp-vit``, and the
``calib-sparse`` quantizer. Registered on import (``recipes.py`` imports this module at its end).

All four run on the ``vit-ptq`` protocol (PSAQ-ViT's quantizer placement, see :mod:`zsq.spec`) and
quantize as the official code does under the ``paper`` budget: weights per-channel min-max
(``QuantLinear``'s ``channel_wise`` weights), activations per-tensor running min/max from **one forward
pass** of the synthetic batch (zkkli/PSAQ-ViT ``test_quant.py`` + ``QuantAct``; Egg-Hu/SMI
``test_quant.py``, the same quantization code; CLAMP-ViT's released evaluator defaults to
``--quant-method minmax``). The ``default`` budget searches the activation ranges by MSE over the same
forward pass instead (chosen on the validation split, see ``VIT_DEFAULT_QUANT``).
The synthesizers (:mod:`zsq.synth.vit`) size the data per budget with their own presets; the
quantizer has nothing to budget (one forward pass), so ``budgets`` only name the presets.

``calib-sparse`` is ``calib`` with SMI's kept-token forward: patches that are exactly zero in every
channel (SMI's dropped patches) are not fed forward while the ranges are observed
(``find_non_zero_patches`` + ``model(x, current_abs_index, next_relative_index)`` in the official
``test_quant.py``); images with the same number of kept patches are batched together.
"""

from __future__ import annotations

from torch import Tensor, nn

from .errors import BadValueError
from .recipes import HPARAM_DEFAULTS, HPARAM_KEYS, QUANTIZERS, RECIPES, QuantContext, Recipe
from .synth.vit import nonzero_patches


class KeptPatches(nn.Module):
    """Wraps a :mod:`zsq.models.vit` model: ``forward(x)`` feeds only the non-zero patches of each image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        kept = nonzero_patches(x, int(self.model.patch_embed.patch_size))
        counts = kept.sum(1)
        out: Tensor | None = None
        for k in counts.unique().tolist():
            rows = (counts == k).nonzero().flatten()
            keep = kept[rows].nonzero()[:, 1].view(len(rows), int(k))  # row-major: each row's indices in order
            y = self.model(x[rows], keep=keep)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out


@QUANTIZERS.register("calib-sparse")
def quant_calib_sparse(ctx: QuantContext) -> nn.Module:
    """Range calibration with SMI's kept-token forward (all-zero patches skipped); else as ``calib``."""
    from .ptq.calibrate import calibrate
    from .quant.protocol import apply_protocol

    if ctx.images is None:
        raise BadValueError("the calib-sparse quantizer needs calibration images (a synthesizer, --synthetic or "
                            "--calib)")
    if not hasattr(getattr(ctx.model, "patch_embed", None), "patch_size"):
        raise BadValueError(f"calib-sparse needs a vision transformer from zsq.models.vit, not "
                            f"{type(ctx.model).__name__} (use --quant calib)")
    h = {**HPARAM_DEFAULTS["calib"], **ctx.hparams}
    q = apply_protocol(ctx.model, ctx.protocol, ctx.w_bits, ctx.a_bits, policy=ctx.policy,
                       w_observer=h["w_observer"], a_observer=h["a_observer"], strict=ctx.strict)
    calibrate(KeptPatches(q), ctx.images, observer=h["a_observer"], batch_size=int(h["calib_batch"]),
              sequential=bool(h["sequential"]))
    return q


HPARAM_KEYS["calib-sparse"] = HPARAM_KEYS["calib"]
HPARAM_DEFAULTS["calib-sparse"] = HPARAM_DEFAULTS["calib"]


#: activation ranges of the ``smoke`` / ``default`` budgets: per-tensor MSE search instead of the official
#: running min/max. Chosen on the validation split (``bench/vit_validation.py``, 5,000 held-out training
#: images): +6.4 to +8.6 top-1 at W4A4 for all four recipes, -0.2..+0.1 at W4A8. ``paper`` keeps min-max.
VIT_DEFAULT_QUANT = {"a_observer": "mse"}


def _vit_recipe(name: str, paper: str, doc: str, quant: str = "calib") -> Recipe:
    """A ViT recipe: its synthesizer of the same name, ``vit-ptq``, per-channel min-max weights and one
    forward pass of the synthetic batch for the activation ranges: the official running min/max under the
    ``paper`` budget, MSE-searched ranges (``VIT_DEFAULT_QUANT``) under ``default`` and ``smoke``; the
    budgets otherwise name the synthesizer's presets (the quantizer has nothing else to budget)."""
    return RECIPES.add(name, Recipe(
        name=name, family="noise-optimization", kind="PTQ", paper=paper, protocol="vit-ptq", synth=name,
        quant=quant, hparams={"w_observer": "minmax", "a_observer": "minmax"},
        budgets={"smoke": {"quant": dict(VIT_DEFAULT_QUANT)}, "default": {"quant": dict(VIT_DEFAULT_QUANT)},
                 "paper": {}}, doc=doc,
    ))


_vit_recipe(
    "psaq-vit", "Patch Similarity Aware Data-Free Quantization for Vision Transformers (Li et al., ECCV 2022)",
    "One batch of 32 images optimised to maximise every block's patch-similarity entropy (KDE of the cosine "
    "similarities of attn@v's patch tokens) + CE to random labels + |TV - v|; Adam lr 0.2, two rounds of 500 "
    "cosine-lr iterations with growing jitter [code: zkkli/PSAQ-ViT generate_data.py]; min-max calibration "
    "with one forward pass [test_quant.py] (paper budget). default: 2 x 150 iterations, MSE activation ranges.",
)
_vit_recipe(
    "psaq-vit-v2", "PSAQ-ViT V2: Towards Accurate and General Data-Free Quantization for Vision Transformers "
    "(Li et al., TNNLS 2023)",
    "PSAQ-ViT's patch-similarity synthesis without labels, plus hard samples: maximise KL(FP || student) "
    "against a W4A8 min-max student the synthesizer quantizes and re-calibrates itself (no public code; the "
    "paper's KD fine-tuning of the student is left out). Calibration as PSAQ-ViT. default: 2 x 100, MSE "
    "activation ranges.",
)
_vit_recipe(
    "smi", "Sparse Model Inversion: Efficient Inversion of Vision Transformers for Data-Free Applications "
    "(Hu et al., ICML 2024)",
    "DeepInversion-style CE + TV_l2 inversion (Adam lr 0.25, 4,000 iterations, batch 32) that stops inverting "
    "the 30% lowest-CLS-attention patches at iterations 50/100/200/300 (they are no longer fed forward); the "
    "final images keep only the foreground patches [code: Egg-Hu/SMI synthesis/smi.py]; min-max calibration "
    "with the kept-token forward [test_quant.py] (paper budget). default: 500 iterations, MSE activation "
    "ranges.",
    quant="calib-sparse",
)
_vit_recipe(
    "clamp-vit", "CLAMP-ViT: Contrastive Data-Free Learning for Adaptive Post-Training Quantization of ViTs "
    "(Ramachandran et al., ECCV 2024)",
    "PSAQ-ViT's loop with a patch-level contrastive loss (neighbouring patches on the grid, similar ones "
    "positive, InfoNCE tau 0.1; the official code has no data generation, details unverified); the paper's "
    "evolutionary search of the quantization parameters is not implemented: min-max calibration (the "
    "released evaluator's default; paper budget). default: 2 x 150 iterations, MSE activation ranges.",
)
