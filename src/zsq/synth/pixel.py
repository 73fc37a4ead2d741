"""The one pixel-optimisation loop behind every noise-optimisation synthesizer (methods.md A.3, C.2, C.3).

DeepInversion, DSG, KW, GZNQ, MixMix, IntraQ, HAST and TexQ all optimise the input pixels of a
batch against a frozen network; they differ in the loss terms, the augmentation of each
iteration, the optimiser schedule and the start. :class:`PixelSynthesizer` is that loop, once;
each method is a subclass that sets its config defaults (its paper's) and adds loss terms.

One batch (:meth:`PixelSynthesizer.make_batch`):

1. target labels (``label_mode``: uniform random, or a balanced cycle through the classes from a
   random offset) when the method uses labels, drawn first;
2. the start ``x`` (``init``: ``gaussian`` N(0, 1), or ZeroQ's tiny integer-uniform noise);
3. Adam on ``x`` (``lr``, ``beta1``, ``beta2``) with ``schedule``: ``plateau`` =
   ``ReduceLROnPlateau(patience, min_lr)`` stepped on the total loss (ZeroQ, IntraQ, HAST),
   ``cosine`` = DeepInversion's ``lr_cosine_policy`` (linear warm-up over ``warmup`` iterations,
   then half a cosine to 0), ``constant``;
4. every iteration the models see an augmented view of ``x``, in this order: data mixing (a hook,
   MixMix), per-image RandomResizedCrop + horizontal flip applied to the whole batch with
   probability ``crop_prob`` (IntraQ), a random roll by up to ``jitter`` px (DeepInversion), a
   horizontal flip of the whole batch with probability 1/2 (``flip``, DeepInversion);
5. loss = ``bns_weight`` x the BN-statistics loss (:class:`~zsq.synth.losses.BNStatsLoss`, the
   method's variant; summed over the models for MixMix) + the method's extra terms, each a function
   of a :class:`PixelState` (logits, labels, soft targets, penultimate features, images);
6. after each Adam step the pixels are optionally clamped to the valid normalised range
   (``clip``: ``[(0 - mean) / std, (1 - mean) / std]`` per channel, DeepInversion);
7. the batch's result is ``x`` after the last step, and ``{"images", "labels"}`` (int64) when the
   method uses labels.

Budgets. ``paper`` presets are the official (or paper) settings. ``default`` presets make 5,120
ResNet-20 images (20 batches of 256, :data:`DEFAULT_SET`) in about 5-10 minutes on two CPU cores.
Measured (batch 256, one thread, bf16 + channels_last, with ``nice`` on a machine busy with another
two-thread job, which costs ~25%: ZeroQ's loop took 0.53 CPU-s per iteration there against its quiet
0.42): 0.57-0.62 CPU-s per iteration for deepinversion, dsg, kw, gznq, intraq and hast, 0.81 for
texq (texture term), 1.49 for mixmix (two models). Quiet estimates ~0.48 / 0.65 / 1.2 s, so
80 iterations x 20 batches = ~770 CPU-s, ~7-8 minutes with two threads on two cores (assuming a
~1.7x gain from the second thread; not measured on a quiet machine); dsg gets 100 (its tiny ZeroQ
start is slower to converge), texq 64 (+ its calibration images), mixmix 40. Plateau patience keeps
the official value in ``default``: compressed with the iterations it stalls the loss after the
initial lr-0.5 overshoot (HAST, batch 64, 100 iterations: patience 5 ends at loss 109, patience 50
at 1.05). ``smoke`` presets (:data:`SMOKE_SET`) run 12-20 iterations on 32 images.

Every random draw comes from the batch's own generator, so a batch is reproducible alone and
batches can be sharded over processes (a subclass with cross-batch state sets ``shardable=False``).
The forward runs under bf16 autocast with channels_last when the config asks (the defaults);
statistics, losses and the pixels stay fp32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import resample_box_flip
from ..errors import BadValueError
from ..record import model_info
from ..train import warmup_cosine_lr
from .base import StepCallback, SynthConfig, Synthesizer, prepared
from .losses import BNStatsLoss, bn_layers

SCHEDULES = ("plateau", "cosine", "constant")
#: set sizes of the presets (module doc): ``default`` = 5,120 images in batches of 256, ``smoke`` = 32
DEFAULT_SET: dict[str, int] = {"n_images": 5120, "batch_size": 256}
SMOKE_SET: dict[str, int] = {"n_images": 32, "batch_size": 32}
INITS = ("gaussian", "uniform")
LABEL_MODES = ("random", "balanced")


@dataclass
class PixelConfig(SynthConfig):
    """Settings of the shared loop; each method's subclass sets its paper's defaults."""

    iters: int = 1000
    lr: float = 0.5
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "plateau"
    patience: int = 50  # plateau
    min_lr: float = 1e-4  # plateau
    warmup: int = 0  # cosine: linear warm-up iterations
    init: str = "gaussian"
    label_mode: str = "random"
    jitter: int = 0  # random roll, px (-1: the method's size-dependent default)
    flip: bool = False  # random horizontal flip of the whole batch
    crop_prob: float = 0.0  # probability of per-image RandomResizedCrop + flip in an iteration
    crop_scale: float = 0.5  # RandomResizedCrop scale=(crop_scale, 1)
    clip: bool = False  # clamp pixels to the valid normalised range after each step
    bns_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("schedule", SCHEDULES), ("init", INITS), ("label_mode", LABEL_MODES)):
            if getattr(self, name) not in allowed:
                raise BadValueError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        if int(self.iters) < 1:
            raise BadValueError(f"iters must be >= 1, got {self.iters}")
        if not float(self.lr) > 0:
            raise BadValueError(f"lr must be > 0, got {self.lr}")
        if not (0 <= float(self.beta1) < 1 and 0 <= float(self.beta2) < 1):
            raise BadValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if int(self.patience) < 0 or int(self.warmup) < 0 or float(self.min_lr) < 0:
            raise BadValueError("patience, warmup and min_lr must be >= 0")
        if int(self.jitter) < -1:
            raise BadValueError(f"jitter must be >= 0 (or -1 for the method's default), got {self.jitter}")
        if not 0 <= float(self.crop_prob) <= 1:
            raise BadValueError(f"crop_prob must be in [0, 1], got {self.crop_prob}")
        if not 0 < float(self.crop_scale) <= 1:
            raise BadValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        check_nonnegative(self, "bns_weight")


def check_nonnegative(cfg: Any, *names: str) -> None:
    """BadValueError unless every named config field is >= 0 (loss weights, margins)."""
    for name in names:
        if not float(getattr(cfg, name)) >= 0:
            raise BadValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")


@dataclass
class PixelState:
    """What a loss term sees at one iteration (all fp32)."""

    it: int
    images: Tensor  # the optimised pixels x (B, C, H, W)
    inputs: Tensor  # the augmented view the models saw
    logits: list[Tensor]  # one (B, K) per model; [0] is the model being quantized
    labels: Tensor | None  # int64 target classes (B,)
    targets: Tensor | None  # soft targets (B, K) when data mixing changed the labels, else None
    features: Tensor | None  # penultimate features of models[0] (input of its last Linear), if asked
    bns: list[BNStatsLoss]  # one per model, holding this forward's statistics


#: ``term(state) -> scalar tensor``: one weighted loss term of a method.
Term = Callable[[PixelState], Tensor]


# ---------------------------------------------------------------------------------------------------
# augmentations (vectorised over the batch; every draw from the batch generator)
# ---------------------------------------------------------------------------------------------------
def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (hi - lo) + lo


def random_resized_crop_flip(x: Tensor, scale: float, generator: torch.Generator,
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """torchvision ``RandomHorizontalFlip(RandomResizedCrop(size, scale=(scale, 1))(img))`` per image.

    Each image gets its own crop (area fraction ~ U(scale, 1), log aspect ratio ~ U(log 3/4,
    log 4/3), position uniform) resized back to the full size by bilinear ``grid_sample``
    (differentiable), and its own flip with probability 1/2. One difference from torchvision: a
    crop wider or taller than the image is clamped to it instead of re-drawn (up to 10 tries, then a
    centre crop), which only matters for scales near 1.
    """
    b, _, h, w = x.shape
    area = _uniform(b, scale, 1.0, generator)
    r = torch.exp(_uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator))
    fw = torch.sqrt(area * r * h / w).clamp(max=1.0)  # crop width / image width
    fh = torch.sqrt(area / r * w / h).clamp(max=1.0)
    cx = (2 * torch.rand(b, generator=generator, device=generator.device) - 1) * (1 - fw)
    cy = (2 * torch.rand(b, generator=generator, device=generator.device) - 1) * (1 - fh)
    sign = torch.where(torch.rand(b, generator=generator, device=generator.device) < 0.5, -1.0, 1.0)
    return resample_box_flip(x, fw, fh, cx, cy, sign, padding_mode="zeros")


def gather_roll(x: Tensor, off: Tensor) -> Tensor:
    """``torch.roll(x, shifts=(off[0], off[1]), dims=(2, 3))`` with ``off`` a tensor (no host sync on CUDA)."""
    rows = (torch.arange(x.shape[2], device=off.device) - off[0]) % x.shape[2]
    cols = (torch.arange(x.shape[3], device=off.device) - off[1]) % x.shape[3]
    return x.index_select(2, rows.to(x.device)).index_select(3, cols.to(x.device))


def random_roll(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """``torch.roll`` by offsets drawn uniformly from [-max_shift, max_shift] (DeepInversion's jitter)."""
    off = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator, device=generator.device)
    if off.device.type != "cpu":  # torch.roll as a gather on the device: no host sync
        return gather_roll(x, off)
    off = off.tolist()
    return torch.roll(x, shifts=(off[0], off[1]), dims=(2, 3))


#: DeepInversion's ``lr_cosine_policy(base_lr, warmup, iters)`` at iteration ``it``: ``cosine_lr(base_lr,
#: it, iters, warmup)`` (:func:`zsq.train.warmup_cosine_lr`)
cosine_lr = warmup_cosine_lr


def num_classes(model: nn.Module) -> int:
    """The model's class count: its record's ``model.num_classes``, else the last Linear's outputs."""
    n = getattr(model_info(model), "num_classes", None)
    if not n:
        last = last_linear(model)
        n = last.out_features if last is not None else 0
    if not n:
        raise BadValueError(f"cannot tell how many classes {type(model).__name__} has (load it with zsq's "
                            "load_model, or pick a synthesizer without labels, e.g. zeroq)")
    return int(n)


def draw_labels(k: int, batch_size: int, generator: torch.Generator, mode: str = "balanced") -> Tensor:
    """Target labels from ``generator``: ``balanced`` = a cycle through the ``k`` classes from a random
    offset (every class ``batch_size / k`` times), ``random`` = uniform draws."""
    if mode == "balanced":
        start = int(torch.randint(0, k, (1,), generator=generator, device=generator.device))
        return (torch.arange(batch_size, device=generator.device) + start) % k
    return torch.randint(0, k, (batch_size,), generator=generator, device=generator.device)


def last_linear(model: nn.Module) -> nn.Linear | None:
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return found[-1] if found else None


def pixel_range(model: nn.Module, channels: int) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` (1, C, 1, 1): the normalised values of pixel 0 and 1 under the model's preprocessing."""
    pre = getattr(model_info(model), "preprocess", None)
    if pre is None:
        raise BadValueError("clip needs the model's normalisation (load it with zsq's load_model, or clip=false)")
    mean = torch.tensor(pre.mean[:channels], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre.std[:channels], dtype=torch.float32).view(1, -1, 1, 1)
    return -mean / std, (1 - mean) / std


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_i -sum_k t_ik log softmax(z_i)_k`` (hard CE when ``targets`` are one-hot)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def label_ce(state: PixelState, weight: float = 1.0) -> Tensor:
    """Cross-entropy of every model's logits against the target labels (soft ones after mixing)."""
    total = 0.0
    for z in state.logits:
        if state.targets is not None:
            total = total + soft_cross_entropy(z, state.targets)
        else:
            total = total + F.cross_entropy(z.float(), state.labels)
    return weight * total


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
class PixelSynthesizer(Synthesizer):
    """Base of the noise-optimisation synthesizers: optimise pixels against BNS + extra terms.

    Subclasses set ``name``, ``Config``, ``bns_variant`` (a :data:`~zsq.synth.losses.BNS_VARIANTS`
    name) and ``uses_labels``, and override the hooks they need: :meth:`bns_options`,
    :meth:`terms`, :meth:`bns_term`, :meth:`extra_models`, :meth:`auxiliary_models`, :meth:`mix`,
    :meth:`after_batch`, :meth:`default_jitter`. They never re-implement the loop
    (:meth:`optimize`); a stage of their own (TexQ's calibration images) calls it too.
    """

    bns_variant: ClassVar[str] = "gdfq"
    uses_labels: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False  # capture the penultimate features (PixelState.features)

    # hooks ----------------------------------------------------------------------------------------
    def bns_options(self, model: nn.Module) -> dict[str, Any]:
        """Overrides of the :class:`BNStatsLoss` variant for ``model`` (margins, layer weights ...)."""
        return {}

    def terms(self, model: nn.Module, labels: Tensor | None, generator: torch.Generator) -> list[Term]:
        """The method's extra loss terms for one batch (called once per batch, after the labels)."""
        return []

    def bns_term(self, state: PixelState) -> Tensor:
        """The BN-statistics part of the loss (before ``bns_weight``): the sum over the models."""
        return sum(b.loss() for b in state.bns)

    def extra_models(self, model: nn.Module) -> list[nn.Module]:
        """Further frozen networks inverted together with ``model`` (MixMix); none by default."""
        return []

    def auxiliary_models(self) -> list[nn.Module]:
        """Networks a term runs but that are not inverted (no BNS; e.g. ADI's student): frozen per batch."""
        return []

    def mix(self, x: Tensor, labels: Tensor | None, n_classes: int,
            generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Data mixing of one iteration: ``(view, soft targets or None)``; identity by default."""
        return x, None

    def after_batch(self, model: nn.Module, images: Tensor, labels: Tensor | None, batch_index: int) -> None:
        """Called with the finished batch (cross-batch state, e.g. IntraQ's running class centres)."""

    def default_jitter(self, image_shape: tuple[int, int, int]) -> int:
        return 0

    # the batch ------------------------------------------------------------------------------------
    def make_labels(self, model: nn.Module, generator: torch.Generator, batch_size: int) -> Tensor:
        return draw_labels(num_classes(model), batch_size, generator, self.config.label_mode)

    def initial_pixels(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        if self.config.init == "uniform":  # ZeroQ's data_utils: (randint(0, 255) - 127.5) / 5418.75
            codes = torch.randint(0, 255, shape, generator=generator, device=generator.device).float()
            return (codes - 127.5) / 5418.75
        return torch.randn(shape, generator=generator, device=generator.device)

    def make_batch(self, model: nn.Module, batch_index: int, generator: torch.Generator, *, batch_size: int,
                   image_shape: tuple[int, int, int], step: StepCallback | None = None) -> Tensor | dict[str, Tensor]:
        if not bn_layers(model):
            raise BadValueError(f"{type(model).__name__} has no BatchNorm2d layer with running statistics: "
                                f"{self.name} matches BN statistics (pick a synthesizer without BNS, e.g. gaussian)")
        labels = self.make_labels(model, generator, batch_size) if self.uses_labels else None
        terms = self.terms(model, labels, generator)
        x = self.initial_pixels((batch_size, *image_shape), generator)
        x = self.optimize(model, x, labels, terms, generator, step=step)
        self.after_batch(model, x, labels, batch_index)
        return x if labels is None else {"images": x, "labels": labels.to(torch.int64)}

    def optimize(self, model: nn.Module, x: Tensor, labels: Tensor | None, terms: list[Term],
                 generator: torch.Generator, *, step: StepCallback | None = None, iters: int | None = None) -> Tensor:
        """The loop: optimise the pixels ``x`` (a fresh start tensor) and return them (fp32, contiguous).

        ``iters`` overrides ``config.iters`` (an extra stage such as TexQ's calibration images).
        """
        cfg = self.config
        iters = cfg.iters if iters is None else int(iters)
        fmt = self.memory_format()
        extras = self.extra_models(model)
        models = [model, *extras]
        n_classes = num_classes(model) if labels is not None else 0
        jitter = self.default_jitter(tuple(x.shape[1:])) if cfg.jitter == -1 else int(cfg.jitter)
        bounds = tuple(b.to(x) for b in pixel_range(model, x.shape[1])) if cfg.clip else None
        x = x.contiguous(memory_format=fmt).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=cfg.patience, min_lr=cfg.min_lr)
                   if cfg.schedule == "plateau" else None)
        feats: list[Tensor | None] = [None]
        with contextlib.ExitStack() as stack:
            for m in [*extras, *self.auxiliary_models()]:  # eval, frozen, channels_last; restored after
                stack.enter_context(prepared(m, cfg.channels_last))
            if self.needs_features:
                head = last_linear(model)
                if head is None:
                    raise BadValueError(f"{self.name} needs penultimate features: {type(model).__name__} "
                                        "has no Linear classifier")
                hd = head.register_forward_pre_hook(lambda mod, args: feats.__setitem__(0, args[0]))
                stack.callback(hd.remove)
            bns = [stack.enter_context(BNStatsLoss.preset(self.bns_variant, m, **self.bns_options(m)))
                   for m in models]
            amp = self.amp(x.device)
            for it in range(iters):
                if cfg.schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = cosine_lr(cfg.lr, it, iters, cfg.warmup)
                opt.zero_grad(set_to_none=True)
                view, soft = self.mix(x, labels, n_classes, generator)
                view = self.augment(view, jitter, generator)
                view = view.contiguous(memory_format=fmt)
                with amp.autocast():
                    logits = [m(view).float() for m in models]
                state = PixelState(it=it, images=x, inputs=view, logits=logits, labels=labels, targets=soft,
                                   features=None if feats[0] is None else feats[0].float(), bns=bns)
                loss = cfg.bns_weight * self.bns_term(state)
                for term in terms:
                    loss = loss + term(state)
                amp.backward(loss)
                amp.step(opt)
                if bounds is not None:
                    with torch.no_grad():
                        x.clamp_(*bounds)
                value = loss.item()
                if plateau is not None:
                    plateau.step(value)
                if step is not None:
                    step(it, iters, value)
        return x.detach().contiguous()

    def augment(self, x: Tensor, jitter: int, generator: torch.Generator) -> Tensor:
        """Crop + flip (probability ``crop_prob``), roll by up to ``jitter`` px, whole-batch flip."""
        cfg = self.config
        dev = generator.device
        if cfg.crop_prob > 0 and float(torch.rand(1, generator=generator, device=dev)) < cfg.crop_prob:
            x = random_resized_crop_flip(x, cfg.crop_scale, generator)
        if jitter > 0:
            x = random_roll(x, jitter, generator)
        if cfg.flip and float(torch.rand(1, generator=generator, device=dev)) < 0.5:
            x = torch.flip(x, dims=(3,))
        return x


__all__ = [
    "DEFAULT_SET", "INITS", "LABEL_MODES", "PixelConfig", "PixelState", "PixelSynthesizer", "SCHEDULES", "SMOKE_SET",
    "Term", "check_nonnegative", "cosine_lr", "label_ce", "last_linear", "num_classes", "pixel_range",
    "random_resized_crop_flip", "random_roll", "soft_cross_entropy",
]
