"""``genie``: Genie-D synthetic data (Jeon, Lee, Kim; CVPR 2023), as the official code makes it.

Source: SamsungLabs/Genie ``distill.py`` / ``main.py`` (methods.md A.3):

* per batch a **fresh generator** (Linear ``latent_dim`` -> 128 x (s/4)^2, BN, up x2, conv3x3
  128->64, BN, LeakyReLU 0.2, up x2, conv3x3 64->3, tanh, BN(3, affine=False); train mode) and
  fresh latents ``z ~ N(0, I)`` of dim 256, optimised jointly; the batch's images are kept, the
  generator thrown away;
* optimisers as the code wires them (its argument names are swapped): latents Adam lr 0.1 with
  ``ReduceLROnPlateau(patience=100, min_lr=1e-4)`` stepped on the loss every iteration; generator
  Adam lr 0.01 with ``ExponentialLR(0.95)`` stepped every 100 iterations;
* loss = the shared BNS loss, Genie's variant (``BNS_VARIANTS["genie"]``: batch mean and unbiased
  std of every BN input, ``||.||^2 / C`` per layer, summed, + the per-image input prior); no label
  term, no TV prior;
* **swing convolution**: the input of every stride > 1 convolution is reflect-padded by 1 px and
  cropped back at a random offset in {0, 1, 2}^2 (new draw every forward), applied with forward
  pre-hooks so the model itself is untouched;
* the images returned are those of the last iteration's forward (before its update), as in the code;
* ``ce_weight`` (0 = off, the published method): an ablation adding cross-entropy of the teacher's
  logits to balanced target labels (the label term of DeepInversion / GDFQ); the plateau schedule and
  the progress trace keep seeing the BNS loss only; ``out_affine`` (off = the published method): an
  ablation letting the generator's last BN learn a per-channel scale and shift;
* 1,024 images in batches of 128, 4,000 iterations per batch (``paper`` budget).

Every random draw (generator initialisation, latents, swing offsets) comes from the batch's own
``torch.Generator``, so a batch is reproducible alone.

Budgets (ResNet-20, 2 cores): ``default`` = 256 images in 2 batches of 128, 300 iterations each with
the learning-rate schedules compressed by the same factor (patience and decay interval 8 instead of
100; benchmarks.md's reduced official run used 256 x 500 with the uncompressed schedule), bf16
autocast + channels_last (measured 1.9x less CPU per iteration than fp32); ``smoke`` = 32 images,
1 batch, 20 iterations. ``paper`` runs fp32 as the official code does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BadValueError
from .base import SYNTHESIZERS, BatchCheckpoint, StepCallback, SynthConfig, Synthesizer, ablation
from .losses import BNStatsLoss, bn_layers
from .pixel import draw_labels, num_classes


@dataclass
class GenieConfig(SynthConfig):
    """Defaults = the official code (SamsungLabs/Genie main.py / distill.py)."""

    n_images: int = 1024  # main.py: samples=1024
    batch_size: int = 128  # distill_batch=128
    iters: int = 4000  # distill_iter=4000
    lr_latent: float = 0.1  # 'lr_g' in the code, applied to z
    lr_generator: float = 0.01  # 'lr_z' in the code, applied to the generator
    latent_dim: int = 256
    plateau_patience: int = 100  # ReduceLROnPlateau(patience=100, min_lr=1e-4) on z
    plateau_min_lr: float = 1e-4
    g_decay: float = 0.95  # ExponentialLR(gamma=0.95) on the generator ...
    g_decay_every: int = 100  # ... stepped every 100 iterations
    swing: int = 1  # jitter (px) of the swing convolution; 0 disables it
    # not Genie-D (an ablation, 0 = off): + ce_weight x CE(teacher logits, balanced target labels), the
    # label term of DeepInversion / GDFQ, for class-confident, class-balanced images
    ce_weight: float = ablation(0.0)
    # not Genie-D (an ablation): a learnable per-channel scale and shift after the generator's last BN,
    # which otherwise fixes every batch's input channels at mean 0 / std 1 (a CIFAR model normalised with
    # ImageNet's mean / std sees real channels at mean 0.03-0.18, std 1.06-1.15)
    out_affine: bool = ablation(False)
    eps: float = 1e-6  # sqrt(running_var + eps)
    precision: str = "auto"
    channels_last: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"n_images": 32, "batch_size": 32, "iters": 20, "plateau_patience": 5, "g_decay_every": 5},
        "default": {"n_images": 256, "batch_size": 128, "iters": 300, "plateau_patience": 8,
                    "g_decay_every": 8},
        "paper": {"precision": "fp32", "channels_last": False},
    }

    def __post_init__(self):
        super().__post_init__()
        if int(self.iters) < 1:
            raise BadValueError(f"iters must be >= 1, got {self.iters}")
        if int(self.g_decay_every) < 1 or int(self.plateau_patience) < 0:
            raise BadValueError("g_decay_every must be >= 1 and plateau_patience >= 0")
        if not float(self.ce_weight) >= 0:
            raise BadValueError(f"ce_weight must be >= 0, got {self.ce_weight}")


class GenieGenerator(nn.Module):
    """Genie's per-batch generator (unconditional DCGAN-style, ``image_size // 4`` start)."""

    def __init__(self, image_size: int = 32, latent_dim: int = 256, c1: int = 128, c2: int = 64, channels: int = 3,
                 out_affine: bool = False):
        super().__init__()
        if image_size % 4:
            raise BadValueError(f"the Genie generator needs an image size divisible by 4, got {image_size}")
        self.init_size = image_size // 4
        self.linear = nn.Linear(latent_dim, c1 * self.init_size ** 2)
        self.conv_layers = nn.Sequential(
            nn.BatchNorm2d(c1),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, stride=1, padding=1),
            nn.BatchNorm2d(c2),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c2, channels, 3, stride=1, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=out_affine),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.linear(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.conv_layers(out)


def gather_window(xp: Tensor, off: Tensor, h: int, w: int) -> Tensor:
    """``xp[:, :, off[1]:off[1] + h, off[0]:off[0] + w]`` with ``off`` a tensor (no host sync on CUDA)."""
    rows = off[1] + torch.arange(h, device=off.device)
    cols = off[0] + torch.arange(w, device=off.device)
    return xp.index_select(2, rows.to(xp.device)).index_select(3, cols.to(xp.device))


def swing_hooks(model: nn.Module, generator: torch.Generator, jitter: int = 1) -> list:
    """Forward pre-hooks making every stride > 1 Conv2d a swing convolution; returns the handles."""

    def hook(mod, args):
        x = args[0]
        off = torch.randint(0, 2 * jitter + 1, (2,), generator=generator, device=generator.device)
        xp = F.pad(x, [jitter] * 4, mode="reflect")
        if off.device.type != "cpu":  # the same window gathered on the device: no host sync per strided conv
            return (gather_window(xp, off, x.shape[2], x.shape[3]), *args[1:])
        off = off.tolist()
        return (xp[:, :, off[1]:off[1] + x.shape[2], off[0]:off[0] + x.shape[3]], *args[1:])

    return [m.register_forward_pre_hook(hook) for m in model.modules()
            if isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1)]


@SYNTHESIZERS.register("genie")
class Genie(Synthesizer):
    """Genie-D: a fresh generator + latents per batch, trained on Genie's BNS loss with swing conv."""

    name = "genie"
    Config = GenieConfig
    resumable = True  # a batch is 300-4,000 iterations: its loop state is checkpointed (synth.base)

    def extra_loss(self, model: nn.Module, generator: torch.Generator, *, batch_size: int,
                   image_shape: tuple[int, int, int]) -> Callable[[int, Tensor], Tensor] | None:
        """Hook for methods built on Genie-D (e.g. SADAG): called once per batch, after the generator,
        latents and optimisers are set up and before the swing hooks are attached; returns
        ``term(iteration, images)`` added to the BNS loss before ``backward`` (``images``: this
        iteration's generator output, possibly bf16), or ``None`` (Genie-D itself: no extra term, no
        random draw). The plateau schedule and the progress trace keep seeing the BNS loss only."""
        return None

    def make_batch(self, model: nn.Module, batch_index: int, generator: torch.Generator, *, batch_size: int,
                   image_shape: tuple[int, int, int], step: StepCallback | None = None,
                   checkpoint: BatchCheckpoint | None = None) -> Tensor:
        cfg = self.config
        if not bn_layers(model):
            raise BadValueError(f"{type(model).__name__} has no BatchNorm2d layer with running statistics: "
                                "Genie-D matches BN statistics (pick a synthesizer without BNS, e.g. gaussian)")
        device = generator.device
        c, h, w = image_shape
        if h != w:
            raise BadValueError(f"the Genie generator makes square images, got {h}x{w}")
        # generator weights initialised from this batch's stream only
        init_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(init_seed)
            gen = GenieGenerator(h, cfg.latent_dim, channels=c, out_affine=cfg.out_affine).to(device)
        gen = gen.to(memory_format=self.memory_format()).train()
        z = torch.randn(batch_size, cfg.latent_dim, generator=generator, device=device).requires_grad_(True)
        opt_z = torch.optim.Adam([z], lr=cfg.lr_latent)
        sched_z = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, patience=cfg.plateau_patience,
                                                             min_lr=cfg.plateau_min_lr)
        opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_generator)
        sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=cfg.g_decay)
        extra = self.extra_loss(model, generator, batch_size=batch_size, image_shape=image_shape)
        # drawn only when used, so Genie-D's own stream (and its images) stay as they were
        labels = draw_labels(num_classes(model), batch_size, generator) if cfg.ce_weight > 0 else None
        handles = swing_hooks(model, generator, cfg.swing) if cfg.swing > 0 else []

        def state() -> dict[str, Any]:  # everything the next iteration reads (every draw comes from ``generator``)
            return {"gen": gen.state_dict(), "z": z.detach().clone(), "opt_z": opt_z.state_dict(),
                    "sched_z": sched_z.state_dict(), "opt_g": opt_g.state_dict(), "sched_g": sched_g.state_dict(),
                    "rng": generator.get_state()}

        start = 0
        saved = checkpoint.restore() if checkpoint is not None else None
        if saved is not None:  # built the same way above, then set to where the interrupted run stopped
            gen.load_state_dict(saved["gen"])
            with torch.no_grad():
                z.copy_(saved["z"])
            opt_z.load_state_dict(saved["opt_z"])
            sched_z.load_state_dict(saved["sched_z"])
            opt_g.load_state_dict(saved["opt_g"])
            sched_g.load_state_dict(saved["sched_g"])
            generator.set_state(saved["rng"])
            start = checkpoint.done
        x = None
        try:
            with BNStatsLoss.preset("genie", model, eps=cfg.eps) as bns:
                amp = self.amp(device)
                for it in range(start, cfg.iters):
                    opt_z.zero_grad(set_to_none=True)
                    opt_g.zero_grad(set_to_none=True)
                    with amp.autocast():
                        x = gen(z)
                        logits = model(x.contiguous(memory_format=self.memory_format()))
                    loss = bns.loss(x.float())
                    total = loss if extra is None else loss + extra(it, x)
                    if labels is not None:
                        total = total + cfg.ce_weight * F.cross_entropy(logits.float(), labels)
                    amp.backward(total)
                    amp.step(opt_z, opt_g)
                    value = loss.item()
                    sched_z.step(value)
                    if (it + 1) % cfg.g_decay_every == 0:
                        sched_g.step()
                    if step is not None:
                        step(it, cfg.iters, value)
                    if checkpoint is not None:
                        checkpoint.step_done(it + 1, cfg.iters, state)
        finally:
            for hd in handles:
                hd.remove()
        return x.detach().float().contiguous()
