"""The ``calib-sparse`` quantizer (``calib`` with SMI's kept-token forward): patches that are exactly zero in
every channel (SMI's dropped patches) are not fed forward while the ranges are observed
(``find_non_zero_patches`` + ``model(x, current_abs_index, next_relative_index)`` in the official
``test_quant.py``); images with the same number of kept patches are batched together. Registered in
:data:`zsq.recipes.QUANTIZERS` on import; the ``smi`` recipe (:mod:`zsq.catalogue.vit`) uses it.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import BadValueError
from ..recipes import HPARAM_KEYS, QUANTIZERS, QuantContext
from ..synth.vit import nonzero_patches
from .quantizers import CalibConfig  # (registers calib, whose settings this one shares)


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
    from ..quant.protocol import apply_protocol
    from .calibrate import calibrate

    if ctx.images is None:
        raise BadValueError("the calib-sparse quantizer needs calibration images (a synthesizer, --synthetic or "
                            "--calib)")
    if not hasattr(getattr(ctx.model, "patch_embed", None), "patch_size"):
        raise BadValueError(f"calib-sparse needs a vision transformer from zsq.models.vit, not "
                            f"{type(ctx.model).__name__} (use --quant calib)")
    h = CalibConfig.from_hparams(ctx.hparams)
    q = apply_protocol(ctx.model, ctx.protocol, ctx.w_bits, ctx.a_bits, policy=ctx.policy,
                       w_observer=h.w_observer, a_observer=h.a_observer, strict=ctx.strict)
    calibrate(KeptPatches(q), ctx.images, observer=h.a_observer, batch_size=h.calib_batch, sequential=h.sequential)
    return q


HPARAM_KEYS["calib-sparse"] = HPARAM_KEYS["calib"]
