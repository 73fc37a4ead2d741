"""The losses and patch operations of the ViT inversion methods (:mod:`zsq.synth.vit`: PSAQ-ViT,
PSAQ-ViT V2, CLAMP-ViT, SMI): patch-similarity entropy, the patch contrastive loss, the taps on a ViT's
blocks and the patch masks and moves of SMI's sparse tokens."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BadValueError


# ---------------------------------------------------------------------------------------------------
# the losses
# ---------------------------------------------------------------------------------------------------
def gaussian_kde(samples: Tensor, points: Tensor, bandwidth: float = 0.01) -> Tensor:
    """Gaussian kernel density of each row of ``samples`` [B, M] at ``points`` [B, P] -> [B, P]
    (PSAQ-ViT's ``utils/kde.py``: ``GaussianKernel`` averaged over the samples)."""
    var = bandwidth ** 2
    d = points.unsqueeze(-1) - samples.unsqueeze(1)  # [B, P, M]
    return torch.exp(-d.pow(2) / (2 * var)).mean(-1) / math.sqrt(2 * math.pi * var)


def differential_entropy(pdf: Tensor, x: Tensor) -> Tensor:
    """``mean_b trapz(-(p + 1e-4) log(p + 1e-4), x)`` (PSAQ-ViT's ``differential_entropy``)."""
    p = pdf + 1e-4
    return torch.trapezoid(-p * torch.log(p), x, dim=-1).mean()


def cosine_matrix(feats: Tensor) -> Tensor:
    """[B, N, D] -> [B, N, N] cosine similarity of every pair of tokens (fp32)."""
    f = F.normalize(feats.float(), dim=-1, eps=1e-8)
    return f @ f.transpose(1, 2)


def patch_similarity_entropy(feats: Tensor, bandwidth: float = 0.01, points: int = 10) -> Tensor:
    """PSAQ-ViT's differentiable patch-similarity entropy of patch features ``feats`` [B, N, D].

    The evaluation grid spans the batch's min..max similarity and is a constant (no gradient).
    """
    sims = cosine_matrix(feats)
    b = sims.shape[0]
    flat = sims.reshape(b, -1)
    lo, hi = float(flat.detach().min()), float(flat.detach().max())
    x = torch.linspace(lo, hi, points, device=flat.device).expand(b, -1)
    return differential_entropy(gaussian_kde(flat, x, bandwidth), x)


def neighbour_mask(grid: int, radius: int, device: torch.device | None = None) -> Tensor:
    """[N, N] bool: patches within Chebyshev distance ``radius`` on a ``grid x grid`` layout, self excluded."""
    idx = torch.arange(grid * grid, device=device)
    r, c = idx // grid, idx % grid
    dist = torch.maximum((r[:, None] - r[None]).abs(), (c[:, None] - c[None]).abs())
    return (dist <= radius) & (dist > 0)


def patch_contrastive_loss(feats: Tensor, grid: int, radius: int = 1, temperature: float = 0.1) -> Tensor:
    """Patch-level multi-positive InfoNCE over spatial neighbourhoods (zsq's reading of CLAMP-ViT).

    ``feats`` [B, N, D] patch features on a ``grid x grid`` layout. Positives of an anchor: the
    neighbours at least as similar as the mean of its neighbours (chosen without gradient).
    """
    sims = cosine_matrix(feats)
    near = neighbour_mask(grid, radius, sims.device).expand_as(sims)
    with torch.no_grad():
        mean = (sims * near).sum(-1, keepdim=True) / near.sum(-1, keepdim=True)
        pos = near & (sims >= mean)
    logits = sims / temperature
    neg_inf = torch.finfo(logits.dtype).min
    all_n = torch.logsumexp(logits.masked_fill(~near, neg_inf), dim=-1)
    pos_n = torch.logsumexp(logits.masked_fill(~pos, neg_inf), dim=-1)
    return (all_n - pos_n).mean()


# ---------------------------------------------------------------------------------------------------
# model access: blocks, hooks, kept patches
# ---------------------------------------------------------------------------------------------------
def vit_blocks(model: nn.Module, who: str) -> Sequence[nn.Module]:
    """The transformer blocks of a :mod:`zsq.models.vit` model, or a one-line BadValueError."""
    blocks = getattr(model, "blocks", None)
    ok = blocks is not None and len(blocks) > 0 and all(
        hasattr(getattr(b, "attn", None), "matmul2") and hasattr(b.attn, "softmax") for b in blocks)
    if not ok or not hasattr(model, "patch_embed"):
        raise BadValueError(f"{who} inverts a vision transformer from zsq.models.vit (attention matmuls as "
                            f"modules), not {type(model).__name__}; convert a timm ViT/DeiT with "
                            "zsq.models.vit.from_timm")
    return blocks


class Tap:
    """Forward hooks keeping ``fn(output)`` of each module from the latest forward (``.out[i]``)."""

    def __init__(self, modules: Sequence[nn.Module], fn: Callable[[Tensor], Tensor]):
        self.modules, self.fn = list(modules), fn
        self.out: list[Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []

    def __enter__(self) -> Tap:
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(
                lambda mod, args, out, i=i: self.out.__setitem__(i, self.fn(out))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def head_mean_patches(out: Tensor) -> Tensor:
    """``attn @ v`` [B, heads, N+1, d] -> head average of the patch tokens [B, N, d] (fp32)."""
    return out.float().mean(1)[:, 1:]


def cls_attention(out: Tensor) -> Tensor:
    """Softmax output [B, heads, N+1, N+1] -> head-averaged attention of CLS to each patch [B, N]."""
    return out.float().mean(1)[:, 0, 1:]


def patch_mask(keep: Tensor, grid: int, patch: int) -> Tensor:
    """[B, K] kept patch indices -> [B, 1, grid x patch, grid x patch] mask of 1 (kept) / 0."""
    m = torch.zeros(keep.shape[0], grid * grid, device=keep.device)
    m.scatter_(1, keep, 1.0)
    m = m.view(-1, 1, grid, grid)
    return m.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def nonzero_patches(images: Tensor, patch: int) -> Tensor:
    """[B, N] bool: patches with at least one non-zero value (SMI's ``find_non_zero_patches``)."""
    b, c, h, w = images.shape
    p = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return (p != 0).any(dim=5).any(dim=3).any(dim=1).reshape(b, -1)


def moved_patches(keep: Tensor, off_rows: int, off_cols: int, flipped: bool, grid: int, patch: int) -> Tensor:
    """Patch indices after rolling the image by (rows, cols) px and flipping it (SMI's
    ``jitter_and_flip_index``): offsets rounded half up to whole patches, then the column flip."""
    s1, s2 = math.floor(off_rows / patch + 0.5), math.floor(off_cols / patch + 0.5)
    r = (torch.div(keep, grid, rounding_mode="floor") + s1) % grid
    c = (keep % grid + s2) % grid
    if flipped:
        c = grid - 1 - c
    return r * grid + c


def jitter_flip(x: Tensor, lim: int, same_offset: bool, flip: bool,
                generator: torch.Generator) -> tuple[Tensor, tuple[int, int, bool]]:
    """Roll by offsets ~ U{-lim, lim} (one for both axes, or one each), then flip with probability 1/2."""
    offs = torch.randint(-lim, lim + 1, (1 if same_offset else 2,), generator=generator,
                         device=generator.device).tolist()
    o1, o2 = offs[0], offs[-1]
    if o1 or o2:
        x = torch.roll(x, shifts=(o1, o2), dims=(2, 3))
    flipped = bool(flip) and float(torch.rand(1, generator=generator, device=generator.device)) < 0.5
    if flipped:
        x = torch.flip(x, dims=(3,))
    return x, (o1, o2, flipped)


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise BadValueError(f"{name} must be comma-separated integers, got '{text}'") from None


def _float_list(text: str, name: str) -> list[float]:
    try:
        return [float(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise BadValueError(f"{name} must be comma-separated numbers, got '{text}'") from None
