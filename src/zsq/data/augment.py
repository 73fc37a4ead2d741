"""Cheap, label-free augmentation of a calibration set (block reconstruction's ``augment`` hparam).

A zero-shot set is small (Genie's default: 256 images) and reconstruction overfits it: on the test-set
budget curve more steps per block stop helping after ~1,000. Flipped / shifted copies of the same images
give the reconstruction more distinct inputs at no synthesis cost. The FP model's targets are computed
on the augmented images themselves, so no label or assumption about the data is needed beyond the
model's own invariances (CIFAR / ImageNet classifiers are trained with these two).

Modes:

* ``none``: the set as it is;
* ``flip``: the set plus its horizontal mirror (2N images);
* ``flipshift``: the set plus ``copies`` copies, each image randomly mirrored and translated by up to
  ``pad`` pixels with zero padding (the CIFAR training crop), i.e. (1 + copies) N images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BadValueError

AUGMENT_MODES = ("none", "flip", "flipshift")


def random_flip_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored with probability 1/2 and translated by (dy, dx) in [-pad, pad]^2, filling
    with zeros; one gather for the whole batch (no per-image loop)."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if pad <= 0:
        return x.clone()
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # n, 1, h, 1
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # n, 1, 1, w
    idx = torch.arange(n)[:, None, None, None]
    ch = torch.arange(images.shape[1])[None, :, None, None]
    return xp[idx, ch, rows, cols].contiguous()


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
    src = images.detach().cpu()
    extra = [random_flip_shift(src, int(pad), g) for _ in range(int(copies))]
    return torch.cat([images, *(e.to(images.device, images.dtype) for e in extra)])
