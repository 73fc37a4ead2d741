"""Uniform affine fake quantization with a straight-through estimator (STE).

``q(x) = s * (round(clamp(x / s + z, qmin, qmax)) - z)`` with an integer zero point ``z`` (equal
to clamping after rounding). Clamping before the straight-through rounding makes the gradient
w.r.t. a learnable step ``s`` exactly LSQ's (Esser et al., 2020): ``round(x/s) - x/s`` where
``qmin < x/s + z < qmax`` and ``qmin - z`` / ``qmax - z`` where clipped.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scaling)."""
    return (x - x * scale).detach() + x * scale


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code: unsigned [0, 2^b-1] or signed [-2^(b-1), 2^(b-1)-1]."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Fake-quantize ``x``; ``scale``/``zero_point`` broadcast against ``x`` (reshape per channel first).

    Computed as ``s * round(clamp(x * (1/s), qmin - z, qmax - z))``: bit-identical to torch's fused
    ``fake_quantize_per_*_affine`` kernels (``round(x * inv_s) + z``, clamped), which the quantizer
    uses when no gradient is needed, so training-time and inference-time forwards agree exactly.
    """
    q = round_ste(torch.clamp(x * (1.0 / scale), qmin - zero_point, qmax - zero_point))
    return q * scale


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integer codes of ``x`` (no gradient), as the deployed model stores them."""
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, signed: bool
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale and zero point covering [lo, hi] (zero always representable exactly)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        qmin, qmax = qrange(bits, signed)
        amax = torch.maximum(-lo, hi)
        scale = (amax / (qmax if signed else qmax)).clamp_min(eps)
        zp = torch.zeros_like(scale)
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zp, qmin, qmax
