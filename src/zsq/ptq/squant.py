"""SQuant: On-the-Fly Data-Free Quantization via Diagonal Hessian Approximation (Guo et al., ICLR 2022).

Data-free weight *rounding*. With the Hessian of the task loss approximated as block diagonal at
three levels (element, kernel = the ``k x k`` weights of one (output, input) channel pair, output
channel), minimising the second-order perturbation becomes the "constrained absolute sum of
error" (CASE) problem on the rounding errors ``err = q - w/s`` (in integer units):

* element: every ``|err| <= 1`` (each weight moves by less than one step from its value);
* kernel (SQuant-K): ``|sum of err over the kernel| <= 0.5``;
* output channel (SQuant-C): ``|sum of err over the channel| <= 0.5``.

Algorithm (the official code's semantics [clevercool/SQuant quant_modules.py, squant_function.py],
re-implemented vectorised over whole weight tensors, no Python loop over channels):

1. start from round-to-nearest (SQuant-E);
2. per kernel, with ``e`` its error sum: flip ``round(|e|)`` elements in the direction that reduces
   ``|e|`` (``e < 0``: round some down-rounded elements up; ``e > 0``: some up-rounded ones down),
   choosing the ones whose rounding error is largest in magnitude, never past the clamp range;
   afterwards the kernel's sum is within 0.5;
3. per output channel, the same over the channel, where each kernel offers at most one candidate:
   if the kernel was "over-flipped" (``round(|e|) >= |e|``) its last flipped element may be flipped
   back (priority: its new error), else its next unflipped candidate may be flipped (priority: its
   error). Kernel sums then stay within 1 and the channel sum falls within 0.5.

Linear layers (``1 x 1`` "kernels") skip the kernel level; depthwise kernels are whole channels,
so the channel level finds nothing left to do. Flips are ranked with a stable sort (ties go to the
lower index), like ``torch.sort`` in the official code.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.modules import QUANT_LAYERS

MODES = ("squant", "squant-k", "squant-c", "squant-e", "nearest")


def _flip(rn, err, cand, prio, k, direction):
    """Flip, per row, the ``k`` candidates of highest priority by ``direction`` (+1 / -1).
    Returns the new ``rn``, ``err``, the flip mask and every element's rank among candidates."""
    g, n = rn.shape
    p = torch.where(cand, prio, torch.full_like(prio, -1.0))
    order = torch.argsort(p, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=rn.device).expand(g, n))
    flip = cand & (rank < k[:, None])
    step = flip.to(rn.dtype) * direction[:, None]
    return rn + step, err + step, flip, rank


def _level(rn, err, up_ok, down_ok, up_prio, down_prio):
    """One CASE level on rows: returns the new state plus what the next level needs."""
    e = err.sum(1)
    up = e < 0
    k = torch.round(e.abs()).to(torch.long)
    direction = torch.where(up, 1.0, -1.0).to(rn.dtype)
    cand = torch.where(up[:, None], up_ok, down_ok)
    prio = torch.where(up[:, None], up_prio, down_prio)
    rn, err, flip, rank = _flip(rn, err, cand, prio, k, direction)
    return rn, err, flip, rank, cand, k, e, up


def squant_round(v: torch.Tensor, qmin: int, qmax: int, kernel: bool = True, channel: bool = True) -> torch.Tensor:
    """SQuant's rounding of ``v`` = ``w / s + z`` (real-valued codes), shaped ``[O, I, K]``
    (output channels, input channels per group, kernel elements). Returns integer-valued codes
    (float tensor) in ``[qmin, qmax]``."""
    if v.dim() != 3:
        raise ValueError("squant_round expects [out, in, kernel] codes")
    o, i, kk = v.shape
    v = v.detach().float()
    rn = torch.round(v).clamp(qmin, qmax)
    err = rn - v
    up_ok = (err < 0) & (rn + 1 <= qmax)
    down_ok = (err > 0) & (rn - 1 >= qmin)
    prio = err.abs()
    if kernel and kk > 1:
        r, e_, f, rank, cand, k, e, up = _level(rn.reshape(o * i, kk), err.reshape(o * i, kk),
                                                up_ok.reshape(o * i, kk), down_ok.reshape(o * i, kk),
                                                prio.reshape(o * i, kk), prio.reshape(o * i, kk))
        over = k.to(e.dtype) >= e.abs()
        # the one candidate each kernel offers to the channel level
        last = f & (rank == (k - 1)[:, None]) & over[:, None] & (k > 0)[:, None]  # may flip back
        nxt = cand & (rank == k[:, None]) & ~over[:, None]  # may flip on
        upk = up[:, None]
        c_up = (last & ~upk) | (nxt & upk)
        c_down = (last & upk) | (nxt & ~upk)
        c_prio = e_.abs()
        rn, err = r.reshape(o, i, kk), e_.reshape(o, i, kk)
        up_ok, down_ok = c_up.reshape(o, i, kk), c_down.reshape(o, i, kk)
        up_prio = down_prio = c_prio.reshape(o, i, kk)
    else:
        up_prio = down_prio = prio
    if channel:
        r, e_, *_ = _level(rn.reshape(o, i * kk), err.reshape(o, i * kk), up_ok.reshape(o, i * kk),
                           down_ok.reshape(o, i * kk), up_prio.reshape(o, i * kk), down_prio.reshape(o, i * kk))
        rn = r.reshape(o, i, kk)
    return rn


def case_objective(codes: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """The CASE terms of a rounding (``[O, I, K]``): max element ``|err|``, sum over kernels of
    ``|kernel error sum|``, sum over channels of ``|channel error sum|``."""
    err = codes - v
    return {"element_max": float(err.abs().max()),
            "kernel_abs_sum": float(err.sum(2).abs().sum()),
            "channel_abs_sum": float(err.sum((1, 2)).abs().sum())}


def codes_view(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(v, s, z)``: a quantized layer's real-valued codes ``w / s + z`` shaped ``[O, I, K]``
    and its per-channel (or per-tensor) step and zero point broadcastable to the weight."""
    wq, w = layer.wq, layer.weight.detach().float()
    s, z = wq._shape(w, wq.scale.detach().float()), wq._shape(w, wq.zero_point.float())
    v = w / s + z
    o = w.shape[0]
    i = w.shape[1] if w.dim() > 1 else 1
    return v.reshape(o, i, -1), s, z


@torch.no_grad()
def squant_layer_(layer: nn.Module, mode: str = "squant") -> dict[str, float]:
    """Round ``layer``'s weight with SQuant in place: the weight is replaced by its dequantized
    codes, so the layer's own weight quantizer reproduces them exactly. Returns the CASE terms."""
    if mode not in MODES:
        raise ValueError(f"unknown SQuant mode {mode}; choose one of {', '.join(MODES)}")
    v, s, z = codes_view(layer)
    wq = layer.wq
    kernel = mode in ("squant", "squant-k")
    channel = mode in ("squant", "squant-c")
    codes = squant_round(v, wq.qmin, wq.qmax, kernel=kernel, channel=channel)
    w = layer.weight
    layer.weight.data.copy_(((codes.reshape(w.shape) - z) * s).to(w.dtype))
    return case_objective(codes, v)


def squant_model_(qmodel: nn.Module, mode: str = "squant", skip: set[str] | None = None) -> dict[str, dict]:
    """SQuant rounding of every quantized layer (weights at <= 8 bits)."""
    out = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, QUANT_LAYERS) and m.wq.bits <= 8 and not (skip and name in skip):
            out[name] = squant_layer_(m, mode)
    return out
