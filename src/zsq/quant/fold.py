"""BatchNorm folding into the preceding convolution (what a deployed integer model does)."""

from __future__ import annotations

import torch
from torch import nn

from .graph import get_parent, trace


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """In place: ``conv`` becomes ``bn(conv(x))`` for BN in eval mode."""
    inv = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(inv.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    new_b = (b - bn.running_mean) * inv + beta
    if conv.bias is None:
        conv.bias = nn.Parameter(new_b)
    else:
        conv.bias.copy_(new_b)


def fold_bn(model: nn.Module, example: torch.Tensor, check: bool = True) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d whose input comes only from a Conv2d; the BN becomes ``nn.Identity``.

    Returns the (conv, bn) name pairs folded. With ``check`` the folded model's output on
    ``example`` is compared to the original (a model that also reads the pre-BN tensor elsewhere
    would fail the check rather than silently change).
    """
    model.eval()
    tr = trace(model, example)
    ref = model(example) if check else None
    pairs = []
    for call in tr.calls:
        if not isinstance(call.module, nn.BatchNorm2d) or len(call.inputs) != 1:
            continue
        prod = tr.producer.get(call.inputs[0])
        if prod is None or not isinstance(prod.module, nn.Conv2d):
            continue
        if [c.name for c in tr.consumers(call.inputs[0])] != [call.name]:
            continue
        pairs.append((prod.name, call.name))
    for conv_name, bn_name in pairs:
        fold_conv_bn(model.get_submodule(conv_name), model.get_submodule(bn_name))
        parent, attr = get_parent(model, bn_name)
        setattr(parent, attr, nn.Identity())
    if check:
        with torch.no_grad():
            out = model(example)
        msg = "BN folding changed the model's output: a pre-BN tensor is used elsewhere"
        if isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor):
            # assert_close's own test (|out - ref| <= atol + rtol * |ref|) without its first-call set-up,
            # which costs about a second of every run
            if out.shape != ref.shape or not torch.isclose(out, ref, rtol=1e-3, atol=1e-3).all():
                raise AssertionError(msg)
        else:  # nested outputs
            torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3, msg=msg)
    return pairs
