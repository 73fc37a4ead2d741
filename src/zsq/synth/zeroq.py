"""``zeroq``: ZeroQ's distilled data (Cai et al., CVPR 2020), as the official code makes it.

Source: amirgholami/ZeroQ ``classification/distill_data.py`` (``getDistilData``),
``classification/utils/data_utils.py`` (``getRandomData``) and ``classification/uniform_test.py``
(methods.md A.3):

* the pixels themselves are optimised, Adam lr 0.5, ``ReduceLROnPlateau(patience=100,
  min_lr=1e-4)`` (torch defaults otherwise: factor 0.1, threshold 1e-4 rel.) stepped on the loss,
  500 iterations per batch;
* loss = BNS with **per-image** statistics on every BN input (mean and ``sqrt(var + 1e-6)`` over
  the spatial positions, unbiased var) against the running mean / ``sqrt(running_var + 1e-6)``,
  ``||.||^2 / B`` per layer, summed over layers, plus the same term on the input image against
  mean 0 / std 1 per channel (``BNS_VARIANTS["zeroq"]``); no label / CE term;
* initial pixels: ``(randint(0, 255) - 127.5) / 5418.75``. The code's comment says "uniform
  samples with mean 0 and variance 1", but it divides by the variance of U(-128, 127), not its
  std, so the start is a tiny uniform noise in about [-0.024, 0.024] (methods.md calls it Gaussian
  noise; ``init="gaussian"`` gives N(0, 1) instead);
* ``uniform_test.py`` makes **one batch of 32** images (``--batch_size 32``, ``num_batch=1``) for
  both ImageNet and CIFAR: that is the ``paper`` budget.

Budgets (ResNet-20 CIFAR-10, 2 cores; measured with bf16 autocast + channels_last, the defaults):

* ``paper``: 32 images x 500 iterations, batch 32: the official run (forward in bf16 unless
  ``precision="fp32"``; same loss trajectory, final BNS 5.7 vs 5.4).
* ``default``: 256 images in one batch of 256 x 120 iterations (~51 CPU-seconds, so about 30 s on
  two quiet cores). With per-image statistics each image's loss is independent of the others
  (the loss is the batch mean of per-image terms, Adam is elementwise; only ``ReduceLROnPlateau``
  sees the batch mean), so one batch of 256 is the official algorithm for 256 images, at 1.26x
  the per-image throughput of batches of 32. 120 iterations: the official trajectory reaches its
  lr-0.5 plateau by iteration ~100 (BNS loss 1300 -> 27) and stays there (25-27) until the plateau
  scheduler first cuts the lr around iteration 250-300 (-> 5.5 at 500); iterations 120-250 buy
  nothing. Measured W4A4 top-1 (2,000 test images, min-max calibration, seed 0): 256 x 150 within
  ~1-2 points of the paper budget, inside the seed-to-seed noise of a 32-image set.
* ``smoke``: 32 images x 30 iterations (a few seconds; BNS loss 1300 -> ~300).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import BadValueError
from .base import SYNTHESIZERS, BatchCheckpoint, StepCallback, SynthConfig, Synthesizer
from .losses import BNStatsLoss

INITS = ("uniform", "gaussian")


@dataclass
class ZeroQConfig(SynthConfig):
    """Defaults = the official code (see the module docstring for each source)."""

    n_images: int = 32  # uniform_test.py: --batch_size 32, getDistilData(num_batch=1)
    batch_size: int = 32
    iters: int = 500  # distill_data.py: for it in range(500)
    lr: float = 0.5  # optim.Adam([gaussian_data], lr=0.5)
    patience: int = 100  # ReduceLROnPlateau(patience=100, min_lr=1e-4)
    min_lr: float = 1e-4
    eps: float = 1e-6  # std = sqrt(var + eps), both sides
    input_prior: bool = True  # the mean 0 / std 1 term on the input image
    init: str = "uniform"  # data_utils.UniformDataset: (randint(0, 255) - 127.5) / 5418.75

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"n_images": 32, "batch_size": 32, "iters": 30},
        "default": {"n_images": 256, "batch_size": 256, "iters": 120},
        "paper": {},
    }

    def __post_init__(self):
        super().__post_init__()
        if self.init not in INITS:
            raise BadValueError(f"zeroq init must be one of {', '.join(INITS)}, got '{self.init}'")
        if int(self.iters) < 0:
            raise BadValueError(f"iters must be >= 0, got {self.iters}")


def initial_pixels(shape: tuple[int, ...], generator: torch.Generator, init: str = "uniform") -> Tensor:
    """ZeroQ's starting images (``uniform``: the official tiny integer-uniform noise)."""
    if init == "gaussian":
        return torch.randn(shape, generator=generator, device=generator.device)
    return (torch.randint(0, 255, shape, generator=generator, device=generator.device).float() - 127.5) / 5418.75


@SYNTHESIZERS.register("zeroq")
class ZeroQ(Synthesizer):
    """Optimise pixels so per-image BN-input statistics match the running statistics (ZeroQ)."""

    name = "zeroq"
    Config = ZeroQConfig
    resumable = True  # its loop state (pixels, Adam, plateau schedule) is checkpointed (synth.base)

    def make_batch(self, model: nn.Module, batch_index: int, generator: torch.Generator, *, batch_size: int,
                   image_shape: tuple[int, int, int], step: StepCallback | None = None,
                   checkpoint: BatchCheckpoint | None = None) -> Tensor:
        cfg = self.config
        x = initial_pixels((batch_size, *image_shape), generator, cfg.init)
        x = x.contiguous(memory_format=self.memory_format()).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=cfg.patience, min_lr=cfg.min_lr)

        def state() -> dict[str, Any]:
            return {"x": x.detach().clone(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "rng": generator.get_state()}

        start = 0
        saved = checkpoint.restore() if checkpoint is not None else None
        if saved is not None:  # continue the interrupted run's loop
            with torch.no_grad():
                x.copy_(saved["x"])
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
            generator.set_state(saved["rng"])
            start = checkpoint.done
        with BNStatsLoss.preset("zeroq", model, eps=cfg.eps, data_eps=cfg.eps, input_prior=cfg.input_prior) as bns:
            amp = self.amp(x.device)
            for it in range(start, cfg.iters):
                opt.zero_grad(set_to_none=True)
                with amp.autocast():
                    model(x)
                loss = bns.loss()
                amp.backward(loss)
                amp.step(opt)
                value = loss.item()
                sched.step(value)
                if step is not None:
                    step(it, cfg.iters, value)
                if checkpoint is not None:
                    checkpoint.step_done(it + 1, cfg.iters, state)
        return x.detach().contiguous()
