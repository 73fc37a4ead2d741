"""Range observers: min-max, EMA min-max, percentile and MSE (L_p) clipping search.

Each returns ``(lo, hi)`` per tensor (shape ``[]``) or per channel (shape ``[C]``); the quantizer
turns them into a scale and zero point. Weight ranges are computed from the weight in one call;
activation observers accumulate over calibration batches.
"""

from __future__ import annotations

import torch

from .fake import fake_quant, qparams_from_range

OBSERVERS = ("minmax", "ema", "percentile", "mse")
#: the kinds :func:`weight_range` computes (``ema`` only means something over a stream of batches)
WEIGHT_OBSERVERS = ("minmax", "percentile", "mse")
_SAMPLE = 1 << 20  # values kept per activation quantizer for percentile / MSE search


def _flat(x: torch.Tensor, per_channel: bool, ch_axis: int) -> torch.Tensor:
    x = x.detach().float()
    if per_channel:
        return x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)
    return x.reshape(1, -1)


def lp_search(
    x2d: torch.Tensor, bits: int, symmetric: bool, signed: bool, p: float = 2.4, grid: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """BRECQ/Genie clipping search: shrink [min, max] by ratios 1.00, 0.99, ... and keep, per row,
    the ratio with the smallest mean |x - q(x)|^p. ``x2d`` is ``[rows, values]``."""
    lo0, hi0 = x2d.min(1).values, x2d.max(1).values
    best = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(grid):
        r = 1.0 - i / grid
        lo, hi = lo0 * r, hi0 * r
        s, z, qmin, qmax = qparams_from_range(lo, hi, bits, symmetric, signed)
        err = (fake_quant(x2d, s[:, None], z[:, None], qmin, qmax) - x2d).abs().pow(p).mean(1)
        better = err < best
        best = torch.where(better, err, best)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


class Observer:
    """Accumulates statistics of the tensors it sees; ``range()`` gives ``(lo, hi)``."""

    def __init__(self, kind: str = "minmax", per_channel: bool = False, ch_axis: int = 0,
                 momentum: float = 0.9, percentile: float = 99.99, p: float = 2.4):
        if kind not in OBSERVERS:
            raise ValueError(f"unknown observer {kind}")
        self.kind, self.per_channel, self.ch_axis = kind, per_channel, ch_axis
        self.momentum, self.percentile, self.p = momentum, percentile, p
        self.lo = self.hi = None
        self.steps = 0
        self.samples: list[torch.Tensor] = []
        self.n_sampled = 0

    def update(self, x: torch.Tensor) -> None:
        f = _flat(x, self.per_channel, self.ch_axis)
        lo, hi = f.min(1).values, f.max(1).values
        if self.kind == "ema" and self.lo is not None:
            # EMA with bias correction (GDFQ lineage); the raw EMAs live in _elo/_ehi
            m = self.momentum
            self._elo = m * self._elo + (1 - m) * lo
            self._ehi = m * self._ehi + (1 - m) * hi
            c = 1 - m ** (self.steps + 1)
            self.lo, self.hi = self._elo / c, self._ehi / c
        elif self.kind == "ema":
            m = self.momentum
            self._elo, self._ehi = (1 - m) * lo, (1 - m) * hi
            self.lo, self.hi = lo, hi
        elif self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self.steps += 1
        if self.kind in ("percentile", "mse") and self.n_sampled < _SAMPLE:
            take = min(f.shape[1], _SAMPLE - self.n_sampled)
            if take < f.shape[1]:
                g = torch.Generator().manual_seed(self.steps)
                idx = torch.randperm(f.shape[1], generator=g)[:take]  # CPU draw: the same sample on every device
                f = f[:, idx.to(f.device)]
            self.samples.append(f)
            self.n_sampled += take

    def range(self, bits: int, symmetric: bool, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data")
        if self.kind == "percentile":
            s = torch.cat(self.samples, 1)
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], dtype=s.dtype, device=s.device)
            lo_hi = torch.quantile(s, q, dim=1)
            return lo_hi[0], lo_hi[1]
        if self.kind == "mse":
            return lp_search(torch.cat(self.samples, 1), bits, symmetric, signed, self.p)
        return self.lo, self.hi


def weight_range(w: torch.Tensor, kind: str, bits: int, per_channel: bool, symmetric: bool,
                 ch_axis: int = 0, p: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of a weight tensor in one shot (min-max or L_p search; per output channel or tensor)."""
    f = _flat(w, per_channel, ch_axis)
    if kind == "mse":
        return lp_search(f, bits, symmetric, signed=symmetric, p=p)
    if kind == "percentile":
        q = torch.tensor([0.0001, 0.9999], dtype=f.dtype, device=f.device)
        r = torch.quantile(f, q, dim=1)
        return r[0], r[1]
    return f.min(1).values, f.max(1).values
