"""The range-calibration and block-reconstruction quantizers (``--quant``): ``calib``, ``adaround``,
``brecq``, ``qdrop``, ``genie-m``. Registered in :data:`zsq.recipes.QUANTIZERS` on import (the recipe
catalogue, :mod:`zsq.catalogue`, imports this module); the recipes using them are declared in
:mod:`zsq.catalogue.calib` and :mod:`zsq.catalogue.reconstruction`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..config import Config, setting
from ..errors import BadValueError
from ..quant.observers import OBSERVERS, WEIGHT_OBSERVERS
from ..recipes import HPARAM_KEYS, QUANTIZERS, QuantContext


@dataclass
class CalibConfig(Config):
    """Range calibration's settings (``calib``, ``calib-sparse``; each recipe's values in :mod:`zsq.catalogue`)."""

    w_observer: str = setting("minmax", choices=WEIGHT_OBSERVERS)  # weight ranges, per the protocol's granularity
    a_observer: str = setting("minmax", choices=OBSERVERS)  # activation ranges over the calibration images
    calib_batch: int = setting(256, minimum=1)  # images per calibration forward
    sequential: bool = False  # quantizers one after another, each on the earlier ones' quantized outputs


HPARAM_KEYS["calib"] = frozenset(CalibConfig.settings())


@QUANTIZERS.register("calib")
def quant_calib(ctx: QuantContext) -> nn.Module:
    """Range calibration only: weights from ``w_observer`` (per the protocol's granularity),
    activation ranges from ``a_observer`` over the calibration images. No learning."""
    from ..quant.protocol import apply_protocol
    from .calibrate import calibrate

    h = CalibConfig.from_hparams(ctx.hparams)
    q = apply_protocol(ctx.model, ctx.protocol, ctx.w_bits, ctx.a_bits, policy=ctx.policy,
                       w_observer=h.w_observer, a_observer=h.a_observer, strict=ctx.strict)
    if ctx.images is None:
        raise BadValueError("the calib quantizer needs calibration images (a synthesizer, --synthetic or --calib)")
    return calibrate(q, ctx.images, observer=h.a_observer, batch_size=h.calib_batch, sequential=h.sequential)


# -- block reconstruction (issue 5): AdaRound, BRECQ, QDrop, Genie-M ------------------------------------------

def _reconstruction_quantizer(method: str, doc: str,
                              extra_keys: tuple[str, ...] = ()) -> Callable[[QuantContext], nn.Module]:
    def run(ctx: QuantContext) -> nn.Module:
        from .reconstruct import quantize_reconstruct

        return quantize_reconstruct(ctx, method)

    from .reconstruct import ReconConfig, ReconEngineConfig

    # extra_keys: hparams only this method's passes read (BRECQ's activation pass: BrecqActConfig's lr_a, iters_a);
    # the others refuse them (a `--set lr_a=0` on genie used to be accepted and silently ignored)
    HPARAM_KEYS[method] = frozenset({*ReconConfig.settings(), *ReconEngineConfig.settings(), *extra_keys})
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
