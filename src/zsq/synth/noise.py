"""``gaussian``: N(0, 1) images in the model's normalised input space, no optimisation.

The data of the ``minmax-noise`` baseline (benchmarks.md, "min-max calibration on 256
Gaussian-noise images": 256 images). It is the same for every budget: it costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import SYNTHESIZERS, StepCallback, SynthConfig, Synthesizer


@dataclass
class GaussianConfig(SynthConfig):
    """256 images (benchmarks.md minmax-noise peer row), one batch of 256."""

    n_images: int = 256
    batch_size: int = 256

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"smoke": {}, "default": {}, "paper": {}}


@SYNTHESIZERS.register("gaussian")
class GaussianNoise(Synthesizer):
    """Standard normal pixels in normalised space (so each channel has mean 0 / std 1)."""

    name = "gaussian"
    Config = GaussianConfig

    def make_batch(self, model: nn.Module, batch_index: int, generator: torch.Generator, *, batch_size: int,
                   image_shape: tuple[int, int, int], step: StepCallback | None = None) -> Tensor:
        return torch.randn((batch_size, *image_shape), generator=generator, device=generator.device)
