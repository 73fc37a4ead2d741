"""AIT's gradient inundation (Choi et al., CVPR 2022) [code: iamkanghyunchoi/ait GDFQ_AIT/optimizer.py,
trainer.py]: SGD whose step on each quantized weight tensor is stretched until enough of its integer
weights move.

With low-bit weights most SGD steps change no integer weight at all. For each quantized weight
tensor ``w`` (a group with ``gi=True``) the step takes a multiplier ``a >= 1`` on the learning rate:
with the Nesterov direction ``g + m (m buf + g)`` (weight decay left out, as the code does), the
fraction of integer codes that differ between ``w`` and ``w - a lr d`` (each quantized per output
channel with its own min-max range, the code's asymmetric quantizer) must reach ``threshold`` (the
``passing_threshold``): ``a`` doubles until it does, then 5 bisection steps (``iters``) narrow it
(stopping early within 1% of the threshold); if plain ``a = 1`` already passes, ``a = 1``. While a
group's ``capped`` is set (the code's first training epoch, ``disable_adalr``) the doubling stops
above 100; afterwards it is unbounded (here: stopped at 2^20, where the code would loop forever on
a zero gradient). The update itself is torch's SGD (momentum buffer, dampening 0, Nesterov, weight
decay) scaled by ``a``; groups with ``gi=False`` (biases, BN parameters: the code's second
optimizer) take ``a = 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: doubling bound of an uncapped search (the official loop has none)
MAX_ALPHA = float(2 ** 20)


def weight_codes(w: Tensor, bits: int) -> Tensor:
    """Integer codes of ``w`` quantized per output channel (dim 0) with its own min-max range, the
    AIT code's asymmetric quantizer: ``clamp(round(s w - round(s lo) - 2^(b-1)), -2^(b-1), 2^(b-1) - 1)``
    with ``s = (2^b - 1) / (hi - lo)``."""
    flat = w.reshape(w.shape[0], -1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    s = (2 ** bits - 1) / (hi - lo).clamp(min=1e-8)
    n = 2 ** (bits - 1)
    return torch.clamp(torch.round(s * flat - (torch.round(s * lo) + n)), -n, n - 1)


def changed_fraction(w: Tensor, codes: Tensor, step: Tensor, bits: int) -> float:
    """Fraction of the integer codes of ``w`` that differ after ``w - step``."""
    return float((weight_codes(w - step, bits) != codes).sum()) / codes.numel()


def inundation_alpha(w: Tensor, direction: Tensor, lr: float, bits: int, threshold: float, iters: int = 5,
                     capped: bool = False) -> float:
    """AIT's learning-rate multiplier for one weight tensor (module docstring)."""
    codes = weight_codes(w, bits)

    def frac(a: float) -> float:
        return changed_fraction(w, codes, a * lr * direction, bits)

    alpha = 1.0
    if frac(alpha) >= threshold:
        return alpha
    while True:
        alpha *= 2
        if frac(alpha) >= threshold or alpha > (100.0 if capped else MAX_ALPHA):
            break
    lo, hi, mid = alpha / 2, alpha, alpha
    for _ in range(iters):
        mid = (lo + hi) / 2
        p = frac(mid)
        if abs(p - threshold) < threshold / 100:
            break
        lo, hi = (mid, hi) if p < threshold else (lo, mid)
    return mid


class InundationSGD(torch.optim.SGD):
    """SGD (torch's update rule and state) with AIT's per-tensor multiplier on the groups with
    ``gi=True``; those groups carry ``bits`` (one per parameter), ``threshold``, ``iters`` and
    ``capped``. The last step's multipliers are in ``last_alphas``."""

    def __init__(self, groups: list[dict], lr: float, momentum: float, weight_decay: float, nesterov: bool,
                 threshold: float, iters: int = 5):
        for grp in groups:
            grp.setdefault("gi", False)
            grp.setdefault("threshold", threshold)
            grp.setdefault("iters", iters)
            grp.setdefault("capped", True)
        super().__init__(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.last_alphas: list[float] = []

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's SGD step with a per-tensor multiplier
        self.last_alphas = []
        for grp in self.param_groups:
            lr, m, wd, nesterov = grp["lr"], grp["momentum"], grp["weight_decay"], grp["nesterov"]
            for i, p in enumerate(grp["params"]):
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                buf = state.get("momentum_buffer")
                alpha = 1.0
                if grp["gi"]:
                    b_t = g if buf is None else m * buf + g
                    alpha = inundation_alpha(p, g + m * b_t, lr, grp["bits"][i], grp["threshold"], grp["iters"],
                                             grp["capped"])
                    self.last_alphas.append(alpha)
                d = g.add(p, alpha=wd) if wd else g
                if m:
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(m).add_(d)
                    d = d.add(buf, alpha=m) if nesterov else buf
                p.add_(d, alpha=-lr * alpha)
        return None
