"""Batched image augmentations: the calibration-set copies of block reconstruction (``augment``), the
CIFAR crop-and-flip (:func:`random_flip_shift`, also bench/train_vit.py's) and the box resampling
behind the random-resized crops of synthesis and QAT (:func:`resample_box_flip`).

Block reconstruction's ``augment`` hparam: cheap, label-free copies of a calibration set.

A zero-shot set is small (Genie's default: 256 images) and reconstruction overfits it: on the test-set
budget curve more steps per block stop helping after ~1,000. Flipped / shifted copies of the same images
give the reconstruction more distinct inputs at no synthesis cost. The FP model's targets are computed
on the augmented images themselves, so no label or assumption about the data is needed beyond the
model's own invariances (CIFAR / ImageNet classifiers are trained with these two). Measured (ResNet-20,
genie, W3A3, 3 seeds; docs/results.md): it brought the reconstruction closer to the FP model on a
validation split but not the test top-1 (77.08 vs 77.17), so no recipe uses it by default.

Modes:

* ``none``: the set as it is;
* ``flip``: the set plus its horizontal mirror (2N images);
* ``flipshift``: the set plus ``copies`` copies, each image translated by up to ``pad`` pixels with zero
  padding and mirrored with probability 1/2 (the CIFAR training crop), i.e. (1 + copies) N images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BadValueError

AUGMENT_MODES = ("none", "flip", "flipshift")


def resample_box_flip(x: torch.Tensor, fw: torch.Tensor, fh: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                      sign: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Per image, the box of width / height ``fw`` / ``fh`` (fractions of the image) centred at ``cx`` /
    ``cy`` (normalised coordinates, -1..1) resampled to the full size (bilinear, differentiable) and
    mirrored where ``sign`` is -1: one affine ``grid_sample`` for the batch. The random-resized-crop
    augmentations of synthesis (``zsq.synth.pixel``) and of the QAT engine draw their boxes and call this."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = fw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = fh
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=False)


def random_flip_shift(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The CIFAR training augmentation on a batch (any dtype, uint8 included): each image cropped back to
    its size from its zero-padded (``pad``) version at a random offset, i.e. translated by up to ``pad``
    pixels, then mirrored with probability 1/2; one gather for the whole batch (no per-image loop).
    Draws: the row offsets, the column offsets, then the flips (bench/train_vit.py trains with it)."""
    b, _, h, w = images.shape
    xp = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
    out = xp.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out).contiguous()


def augment_set(images: torch.Tensor, mode: str = "none", *, copies: int = 1, pad: int = 4,
                seed: int = 0) -> torch.Tensor:
    """``images`` (N, C, H, W) followed by their augmented copies (see the module doc); the originals
    come first and unchanged, so the first images (activation-range initialisation) are the same."""
    if mode not in AUGMENT_MODES:
        raise BadValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got '{mode}'")
    if int(copies) < 1 or int(pad) < 0:
        raise BadValueError(f"augment needs copies >= 1 and pad >= 0, got copies={copies}, pad={pad}")
    if mode == "none":
        return images
    if mode == "flip":
        return torch.cat([images, images.flip(-1)])
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    return torch.cat([images, *(random_flip_shift(images, g, int(pad)) for _ in range(int(copies)))])
