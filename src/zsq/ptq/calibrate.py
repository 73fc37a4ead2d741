"""Range calibration: run calibration images through the quantized model and set every activation
quantizer's range from what it observed (min-max, percentile or L_p search)."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.modules import Quantizer


def act_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer) and not n.endswith("wq")]


@torch.inference_mode()
def calibrate(model: nn.Module, images: torch.Tensor, observer: str = "minmax", batch_size: int = 256,
              sequential: bool = False) -> nn.Module:
    """Set activation ranges from ``images`` (already normalised, ``[N,3,H,W]``).

    ``sequential=False`` observes every quantizer on FP activations (weights quantized) in one pass.
    ``sequential=True`` calibrates quantizers one after another in network order, each seeing the
    activations produced with the earlier ones already quantized (closer to deployment, N passes).
    """
    model.eval()
    aqs = act_quantizers(model)
    if not aqs:
        return model
    device = next((p.device for p in model.parameters()), images.device)
    batches = [b.to(device) for b in torch.split(images, batch_size)]  # the model's device (no copy when there)
    if not sequential:
        for _, q in aqs:
            q.start_observing(observer)
        for b in batches:
            model(b)
        for _, q in aqs:
            q.finish_observing()
        return model
    for _, q in aqs:
        q.mode = "off"
    for _, q in _in_forward_order(model, aqs, images[:2].to(device)):
        q.start_observing(observer)
        for b in batches:
            model(b)
        q.finish_observing()
    return model


def _in_forward_order(model, aqs, example):
    order = []
    hooks = [q.register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n, q in aqs]
    with torch.inference_mode():
        model(example)
    for h in hooks:
        h.remove()
    by_name = dict(aqs)
    seen = []
    for n in order:
        if n not in seen:
            seen.append(n)
    return [(n, by_name[n]) for n in seen]
