"""The IntraQ code base's synthesizers: ``intraq``, ``hast``, ``texq``.

All three run the shared pixel loop (:class:`~zsq.synth.pixel.PixelSynthesizer`) as the IntraQ /
HAST data generators do: N(0, 1) start, uniform random labels, Adam lr 0.5 on the pixels with
``ReduceLROnPlateau(patience=50, min_lr=1e-4)`` stepped on the total loss, 1,000 iterations per
batch of 256, 5,120 images (4 groups x 5 batches), GDFQ's BNS (batch mean / biased variance, MSE,
averaged over layers: ``BNS_VARIANTS["gdfq"]``).

``intraq`` -- IntraQ (Zhong et al., CVPR 2022). Source: zysxmu/IntraQ
``data_generate/distill_data.py`` (``getDistilData_hardsample_cosineDistanceEMA_interClass_aug``)
and ``run_generate_cifar10.sh`` (CIFAR-10 values are the defaults):

* per iteration, with probability 1/2 (``crop_prob``), every image gets its own
  RandomResizedCrop(scale=(0.5, 1)) + RandomHorizontalFlip (local object reinforcement);
* soft target loss: ``mean_i (softmax(f(x_i))_{y_i} - t_i)^2`` (the code's masked MSE to a target
  vector: only the target class's entry counts), t_i ~ U(``target_pro``, 1) for each sample with
  probability 1/2 (``soft_fraction``), else 1; ``target_pro = 0.95`` (CIFAR; ImageNet 1.0);
* marginal distance constraint on the penultimate features h_i (the input of the classifier =
  the code's ``final_pool`` output) vs the class centre c_{y_i}: ``sum_i mask_i [max(0, m_low -
  d_i) + max(0, d_i - m_up)] / (sum_i mask_i + 1e-6)`` with ``d_i = 1 - cos(h_i, c_{y_i})``
  (cosine eps 1e-6), ``m_low = 0.05``, ``m_up = 0.8`` (CIFAR; ImageNet 0 and 2, i.e. off).
  **Centres** (``centres``): the code's centre is the mean feature of all images of that class made
  in *earlier* batches (clean images, teacher in eval mode), fixed during a batch, absent (mask 0)
  for the first batch. That makes batches depend on each other. zsq's default, ``centres="batch"``,
  keeps batches independent: c_{y_i} is the leave-one-out mean of the (detached) features of the
  *other* images of class y_i in the same batch at the same iteration (mask 0 when i is alone in its
  class). With 256 images and 10 classes each centre averages ~25 images, like the code's once a
  few batches exist. ``centres="running"`` is the code's rule: state kept on the synthesizer
  instance, so the batches must be made in order in one process (``shardable`` is then false, and
  resuming an interrupted set is refused: delete it or use ``centres="batch"``).
* total loss = BNS + soft target loss + both margin terms, all weight 1.

``hast`` -- HAST (Li et al., CVPR 2023). Source: lihuantong/HAST ``data_generate/distill_data.py``
(``getDistilData_hardsample``) and ``run_generate_cifar10.sh``: IntraQ's loop without the soft
target and margin terms; loss = BNS + ``beta`` x mean_i((1 - p_{i,y_i})^gamma CE_i), p = softmax
(p not detached, as in the code), ``beta = 10``, ``gamma = 2`` for CIFAR-10; no augmentation for
CIFAR (``crop_prob = 0``; the ImageNet run uses IntraQ's crop + flip with probability 1/2).

``texq`` -- TexQ (Chen et al., NeurIPS 2023; the code link has no code, methods.md A.3, **details
unverified**): (1) calibration images per class are synthesised first (BNS + CE, the same loop) and
their **texture features** give per-class calibration centres; (2) the set is synthesised with
BNS + CE + ``tex_weight`` x texture alignment to those centres. zsq's reading:

* texture features T(x): Laws' texture energy -- the 5-tap vectors L5 (level), E5 (edge), S5
  (spot), R5 (ripple), their 16 outer-product 5x5 masks without L5L5, symmetric pairs averaged
  (E5L5/L5E5 etc.): 9 rotation-invariant masks, applied to each colour channel of the image
  (reflect padding), energy = mean absolute response over the image: 27 numbers per image
  (:func:`laws_energy`);
* calibration: ``calib_per_class`` images per class (balanced labels), ``calib_iters`` iterations,
  from a generator seeded by ``calib_seed`` only, so every batch (and every process) recomputes the
  same centres and batches stay independent (computed once per synthesizer instance and model);
* alignment: ``mean_i mean_k ((T_k(x_i) - c_{y_i,k}) / s_k)^2`` with c the class centre and s the
  per-feature std over all calibration images (scale-free);
* loop and BNS as IntraQ's (crop + flip with probability 1/2), CE weight 1, ``tex_weight = 1``.

Budgets (:mod:`zsq.synth.pixel`): ``paper`` = 5,120 images, 1,000 iterations per batch of 256;
``default`` = 5,120 images in 20 batches of 256, 80 iterations with the official plateau patience
50 (texq: 64 iterations, calibration 10 x 8 images x 64 iterations); ``smoke`` = 32 images, 12
iterations, patience 5.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BadValueError
from .base import SYNTHESIZERS, SynthConfig, batch_seed, model_fingerprint
from .pixel import (
    DEFAULT_SET, SMOKE_SET, PixelConfig, PixelState, PixelSynthesizer, Term, check_nonnegative, label_ce, last_linear,
)

CENTRES = ("batch", "running")


@dataclass
class IntraQLoopConfig(PixelConfig):
    """The IntraQ / HAST generators' loop (zysxmu/IntraQ, lihuantong/HAST distill_data.py)."""

    n_images: int = 5120  # 4 groups x 5 batches x 256
    batch_size: int = 256
    iters: int = 1000  # for it in range(500*2)
    lr: float = 0.5
    patience: int = 50
    min_lr: float = 1e-4
    crop_prob: float = 0.5  # if random.random() < 0.5: RHF(RRC(x_j)) per image
    crop_scale: float = 0.5  # --augMargin 0.5

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {**SMOKE_SET, "iters": 12, "patience": 5},
        "default": {**DEFAULT_SET, "iters": 80},
        "paper": {},
    }


@dataclass
class IntraQConfig(IntraQLoopConfig):
    """IntraQ's CIFAR-10 values (run_generate_cifar10.sh)."""

    target_pro: float = 0.95  # --targetPro
    soft_fraction: float = 0.5  # modify_labels: random.random() < 0.5
    margin_low: float = 0.05  # --cosineMargin
    margin_up: float = 0.8  # --cosineMargin_upper
    centres: str = "batch"  # zsq default; "running" = the code's cross-batch centres

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= float(self.target_pro) <= 1 or not 0 <= float(self.soft_fraction) <= 1:
            raise BadValueError("target_pro and soft_fraction must be in [0, 1]")
        check_nonnegative(self, "margin_low", "margin_up")
        if self.centres not in CENTRES:
            raise BadValueError(f"centres must be one of {', '.join(CENTRES)}, got '{self.centres}'")


def soft_target_loss(logits: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """IntraQ's ``mean_i sum_c (softmax_ic - t_ic)^2 * onehot_ic`` = ``mean_i (p_{i,y_i} - t_i)^2``."""
    p = F.softmax(logits.float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    return (p - target).pow(2).mean()


def focal_ce(logits: Tensor, labels: Tensor, beta: float, gamma: float) -> Tensor:
    """HAST's ``beta * mean_i((1 - p_{i,y_i})^gamma * CE_i)`` (p not detached, as in the code).

    ``1 - p`` is ``-expm1(log p)`` (exact for confident samples) clamped at 1e-12: with ``gamma`` < 1
    (SynQ's 0.5) the power's derivative is infinite at ``p = 1``, which a confident sample reaches in
    float32, and one such sample made the whole batch NaN."""
    logp = F.log_softmax(logits.float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    q = (-torch.expm1(logp)).clamp_min(1e-12)
    return beta * (q.pow(gamma) * -logp).mean()


def margin_loss(features: Tensor, centres: Tensor, mask: Tensor, low: float, up: float) -> Tensor:
    """IntraQ's marginal distance constraint (both hinge terms) on ``d = 1 - cos(h, c)``."""
    d = 1.0 - F.cosine_similarity(features, centres, dim=1, eps=1e-6)
    hinge = torch.relu(low - d) + torch.relu(d - up)
    return (hinge * mask).sum() / (mask.sum() + 1e-6)


def leave_one_out_centres(features: Tensor, labels: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """Per image the mean feature of the *other* images of its class in the batch, and a 0/1 mask
    (0 where the image is alone in its class)."""
    one = F.one_hot(labels, n_classes).to(features.dtype)  # (B, K)
    sums = one.t() @ features  # (K, D)
    counts = one.sum(0)  # (K,)
    others = (counts[labels] - 1).clamp(min=1).unsqueeze(1)
    centres = (sums[labels] - features) / others
    return centres, (counts[labels] > 1).to(features.dtype)


@SYNTHESIZERS.register("intraq")
class IntraQ(PixelSynthesizer):
    """IntraQ: BNS + soft target loss + marginal cosine distance to class centres, crop + flip."""

    name = "intraq"
    Config = IntraQConfig
    needs_features = True

    def __init__(self, config: SynthConfig | None = None):
        super().__init__(config)
        self.shardable = self.config.centres != "running"
        self._sums: Tensor | None = None  # running centres: per-class feature sums and counts
        self._counts: Tensor | None = None
        self._next = 0

    def terms(self, model: nn.Module, labels: Tensor | None, generator: torch.Generator) -> list[Term]:
        cfg = self.config
        dev = generator.device
        b = labels.shape[0]
        soft = torch.rand(b, generator=generator, device=dev) < cfg.soft_fraction
        t = torch.rand(b, generator=generator, device=dev) * (1 - cfg.target_pro) + cfg.target_pro
        target = torch.where(soft, t, torch.ones_like(t))
        out: list[Term] = [lambda s: soft_target_loss(s.logits[0], s.labels, target)]
        low, up = cfg.margin_low, cfg.margin_up
        if cfg.centres == "running":
            centres, mask = self._running_centres(model, labels)
            out.append(lambda s: margin_loss(s.features, centres, mask, low, up))
        else:
            def in_batch(s: PixelState) -> Tensor:
                c, m = leave_one_out_centres(s.features.detach(), s.labels, s.logits[0].shape[1])
                return margin_loss(s.features, c, m, low, up)

            out.append(in_batch)
        return out

    def _running_centres(self, model: nn.Module, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The code's centres: mean feature per class over the earlier batches (mask 0: none yet)."""
        if self._sums is None:
            head = last_linear(model)
            self._sums = torch.zeros(head.out_features, head.in_features, device=labels.device)
            self._counts = torch.zeros(head.out_features, device=labels.device)
        counts = self._counts[labels]
        return self._sums[labels] / counts.clamp(min=1).unsqueeze(1), (counts > 0).float()

    def make_batch(self, model: nn.Module, batch_index: int, generator: torch.Generator, **kw):
        if self.config.centres == "running":
            if batch_index == 0:  # a new set: start the centres afresh
                self._sums = self._counts = None
                self._next = 0
            elif batch_index != self._next:
                raise BadValueError(f"intraq centres='running' makes batches in order in one process: batch "
                                    f"{batch_index} asked after {self._next} batch(es); delete the partial set "
                                    "or use centres='batch'")
        return super().make_batch(model, batch_index, generator, **kw)

    def after_batch(self, model: nn.Module, images: Tensor, labels: Tensor | None, batch_index: int) -> None:
        if self.config.centres != "running":
            return
        feats: list[Tensor] = []
        hd = last_linear(model).register_forward_pre_hook(lambda mod, args: feats.append(args[0].float()))
        try:
            with torch.no_grad():
                model(images.contiguous(memory_format=self.memory_format()))
        finally:
            hd.remove()
        one = F.one_hot(labels, self._sums.shape[0]).float()
        self._sums += one.t() @ feats[0]
        self._counts += one.sum(0)
        self._next = batch_index + 1


# ---------------------------------------------------------------------------------------------------
# HAST
# ---------------------------------------------------------------------------------------------------
@dataclass
class HASTConfig(IntraQLoopConfig):
    """HAST's CIFAR-10 values (run_generate_cifar10.sh: --beta 10 --gamma 2; no augmentation)."""

    crop_prob: float = 0.0  # CIFAR: no augmentation (ImageNet: 0.5)
    beta: float = 10.0
    gamma: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(self, "beta", "gamma")


@SYNTHESIZERS.register("hast")
class HAST(PixelSynthesizer):
    """HAST: BNS + focal-style CE that keeps hard samples hard."""

    name = "hast"
    Config = HASTConfig

    def terms(self, model: nn.Module, labels: Tensor | None, generator: torch.Generator) -> list[Term]:
        cfg = self.config
        return [lambda s: focal_ce(s.logits[0], s.labels, cfg.beta, cfg.gamma)]


# ---------------------------------------------------------------------------------------------------
# TexQ
# ---------------------------------------------------------------------------------------------------
_LAWS = {"L5": (1.0, 4.0, 6.0, 4.0, 1.0), "E5": (-1.0, -2.0, 0.0, 2.0, 1.0),
         "S5": (-1.0, 0.0, 2.0, 0.0, -1.0), "R5": (1.0, -4.0, 6.0, -4.0, 1.0)}


def laws_masks() -> Tensor:
    """The 9 rotation-invariant Laws masks (9, 5, 5): symmetric pairs averaged, L5L5 left out."""
    vecs = {k: torch.tensor(v) for k, v in _LAWS.items()}
    masks = []
    for a, b in itertools.combinations_with_replacement(list(_LAWS), 2):
        if a == b == "L5":
            continue
        masks.append(0.5 * (torch.outer(vecs[a], vecs[b]) + torch.outer(vecs[b], vecs[a])))
    return torch.stack(masks)


def laws_energy(x: Tensor, masks: Tensor | None = None) -> Tensor:
    """(B, C * 9) Laws texture energy: mean |mask * channel| over the image, per channel and mask."""
    m = laws_masks() if masks is None else masks
    c = x.shape[1]
    w = m.to(x.device, torch.float32).repeat(c, 1, 1).unsqueeze(1)  # (C*9, 1, 5, 5)
    xp = F.pad(x.float(), (2, 2, 2, 2), mode="reflect")
    return F.conv2d(xp, w, groups=c).abs().mean((2, 3))


@dataclass
class TexQConfig(IntraQLoopConfig):
    """IntraQ's loop + BNS + CE + texture alignment (zsq's reading; unverified)."""

    ce_weight: float = 1.0
    tex_weight: float = 1.0
    calib_per_class: int = 8
    calib_iters: int = 1000
    calib_seed: int = 0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {**IntraQLoopConfig.PRESETS["smoke"], "calib_per_class": 2, "calib_iters": 8},
        "default": {**DEFAULT_SET, "iters": 64, "calib_iters": 64},
        "paper": {},
    }

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(self, "ce_weight", "tex_weight")
        if int(self.calib_per_class) < 1 or int(self.calib_iters) < 1:
            raise BadValueError("calib_per_class and calib_iters must be >= 1")


@SYNTHESIZERS.register("texq")
class TexQ(PixelSynthesizer):
    """TexQ: BNS + CE + alignment of Laws texture energy to per-class calibration centres."""

    name = "texq"
    Config = TexQConfig

    def __init__(self, config: SynthConfig | None = None):
        super().__init__(config)
        self._centres: dict[tuple, tuple[Tensor, Tensor]] = {}  # (weights, shape) -> centres, spread
        self._batch_centres: tuple[Tensor, Tensor] | None = None

    def calibration_centres(self, model: nn.Module, image_shape: tuple[int, ...],
                            device: torch.device) -> tuple[Tensor, Tensor]:
        """(K, C*9) class centres and (C*9,) spread of the calibration images' texture energy."""
        key = (model_fingerprint(model)["weights_sha256"], tuple(image_shape))
        if key not in self._centres:
            cfg = self.config
            k = last_linear(model).out_features
            g = torch.Generator(device=device).manual_seed(batch_seed(cfg.calib_seed, -1))
            labels = torch.arange(k * cfg.calib_per_class, device=device) % k
            x = self.initial_pixels((labels.shape[0], *image_shape), g)
            calib = self.optimize(model, x, labels, [self._ce], g, iters=cfg.calib_iters)
            t = laws_energy(calib)
            one = F.one_hot(labels, k).float()
            self._centres[key] = ((one.t() @ t) / one.sum(0).unsqueeze(1), t.std(0).clamp(min=1e-6))
        return self._centres[key]

    def _ce(self, s: PixelState) -> Tensor:
        return label_ce(s, self.config.ce_weight)

    def make_batch(self, model: nn.Module, batch_index: int, generator: torch.Generator, *, batch_size: int,
                   image_shape: tuple[int, int, int], step=None):
        # the calibration stage first, outside this batch's hooks (its own generator: no draw from this batch's)
        self._batch_centres = self.calibration_centres(model, image_shape, generator.device)
        return super().make_batch(model, batch_index, generator, batch_size=batch_size, image_shape=image_shape,
                                  step=step)

    def terms(self, model: nn.Module, labels: Tensor | None, generator: torch.Generator) -> list[Term]:
        centres, spread = self._batch_centres
        tw = self.config.tex_weight
        return [self._ce, lambda s: tw * ((laws_energy(s.images) - centres[s.labels]) / spread).pow(2).mean()]


__all__ = [
    "HAST", "HASTConfig", "IntraQ", "IntraQConfig", "TexQ", "TexQConfig", "focal_ce", "laws_energy", "laws_masks",
    "leave_one_out_centres", "margin_loss", "soft_target_loss",
]
