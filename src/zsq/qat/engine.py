"""Distillation fine-tuning (QAT) of a fake-quantized student on a fixed synthetic set: the student
side shared by the GDFQ lineage (methods.md A.2 skeleton, C.7, D.1).

The student is the model laid out by a protocol (``qat`` natively: every Conv/Linear at W bits,
an activation quantizer after every ReLU, BN kept); the teacher is the FP model, frozen, in eval
mode, its passes under ``torch.inference_mode``. Each step draws a batch from the synthetic images,
optionally augments it, and minimises

    kd_weight * T^2 * KL(softmax(f(x)/T) || softmax(Q(x)/T))        (Hinton KD, f teacher, Q student)
  + ce_weight * CE(Q(x), argmax f(x))                               (CE on the teacher's pseudo-labels)
  + bns_weight * L_BNS(student BN inputs vs running statistics)     (zsq.synth.losses.BNStatsLoss)

with SGD (momentum 0.9, Nesterov, weight decay on every parameter) and a cosine learning rate over
the training steps. Sources, for the defaults of :class:`QATConfig` (CIFAR values; ImageNet in
brackets): IntraQ [code: zysxmu/IntraQ trainer_direct.py, main_direct.py, cifar10_resnet20.hocon],
which fine-tunes on a fixed set of 5,120 synthetic images: 151 epochs x 200 iterations, batch 256
[16], SGD-Nesterov lr 1e-4 [1e-6], momentum 0.9, weight decay 1e-4, ``alpha * T^2 *
KLDivLoss(reduction="batchmean")`` with alpha = T = 20 (HAST and SynQ keep this loop and loss; HAST
CIFAR-10: batch 64, lr 1e-5). GDFQ/Qimera use ``KLDivLoss()``'s elementwise mean with alpha 1
(``kd_reduction="mean"``, ``kd_weight=1``) [code: xushoukai/GDFQ trainer.py].

Choices, and where they differ from the official code:

* **Warm-up = range calibration**: during the first ``ema_epochs`` epochs the student is **not**
  trained; its activation ranges follow the EMA (below) while the losses are only measured (the
  lineage's trainers call ``backward_S`` only from ``epoch >= warmup_epochs = 4``, IntraQ's from
  ``epoch >= 4``, and freeze the ranges after epoch 4). IntraQ runs that
  warm-up on GDFQ-generator images (methods.md A.3 pitfall); here it runs on the synthetic set.
* **Schedule**: one cosine from ``lr`` over the training steps after the warm-up (the official
  multi-step x0.1 at epochs 20/40/60 leaves the lr at 1e-7 for 90 of IntraQ's 151 epochs). Every
  run reports its **last** epoch: no model selection on a test set (the official code keeps the
  best test epoch).
* **Loss terms**: the lineage's CE uses the synthesis labels (GDFQ, IntraQ); zsq's synthetic sets
  need not carry labels, so without them ``ce_weight`` puts CE on the teacher's argmax instead; 0
  by default (as AIT and HAST, which drop the CE). ``bns_weight`` (0 by default; no official student loss has it)
  matches the student's BN-input statistics to the running ones, ``bns_variant`` of C.1.
* **BN**: kept unfolded with **frozen statistics**: the student stays in ``eval()`` all along
  (IntraQ's ``self.model.eval()`` in ``train``), so running means/variances never move, while the BN
  affine parameters (gamma, beta) are trained with everything else. Under a protocol that folds BN
  (``ptq``, ``fixed``) the folded conv biases are trained instead.
* **Weights**: per-output-channel asymmetric min-max range recomputed from the current FP weights
  before every step (the official ``Quant_Conv2d`` recomputes it every forward), zsq's fake
  quantizer with a straight-through round; the final weights' ranges are set once more at the end.
* **Activations**: per-tensor asymmetric ranges from an EMA of the batch min/max, momentum 0.9 with
  bias correction (:class:`zsq.quant.observers.Observer` ``"ema"``), updated at every student
  forward of the warm-up and frozen afterwards; each activation is quantized with the range just
  updated, as the official ``QuantAct`` does. If the run has no more epochs than ``ema_epochs``, the
  warm-up is the first 2% of the steps (at least one). Two deviations: (1) the
  official update divides the *already corrected* value by ``1 - 0.9^t`` again at every step (a
  transient that decays within ~50 steps); the observer keeps the raw EMA apart and corrects it
  once; (2) zsq's fake quantizer passes no gradient to values clipped by the range (clipped STE;
  the official ``AsymmetricQuantFunction`` passes every gradient through).
* **Augmentation** (``augment``): IntraQ's fine-tuning dataset applies ``RandomResizedCrop(scale
  (0.5, 1))`` + horizontal flip to every synthetic image, teacher and student seeing the same crop.
  Here it is one batched bilinear resampling with a crop box and flip drawn per image (continuous
  box positions; sides clipped to the image instead of torchvision's rejection loop).
* **Batches**: each step draws ``batch_size`` distinct images at random (the official loader
  shuffles the set each pass and drops the last incomplete batch; IntraQ's batch is
  ``min(batch, n)`` like here).

**Method-specific terms** (issue 8; each off by default, and then not computed at all). The trainer
takes optional ``labels`` aligned with ``images`` (the synthesis labels of a set that has them);
every batch indexes both with the same draw.

* ``ce_weight`` x CE(Q(x), y): ``ce_target`` ``labels`` = the synthesis labels (GDFQ, IntraQ
  [code: zysxmu/IntraQ trainer_direct.py]), or the teacher's argmax when the set has none;
  ``teacher`` = always the teacher's argmax. ``ce_select`` keeps only some samples (CE summed over
  them, divided by the batch size): ``easy`` = SynQ's selective CE, samples whose teacher difficulty
  ``1 - p_y`` (softmax at T = 1, on the batch as trained) is below ``ce_tau`` = 0.5 [code:
  snudm-starlab/SynQ trainer_direct.py; its masked rows add a constant log(C) each to the value, not
  to the gradient: left out]; ``reliable`` = PLF's pseudo-label filtering [paper; details
  unverified, zsq's reading]: once, before training, each image's reliability is the teacher's
  self-entropy divided by log(C); the CE (hard pseudo-label) keeps the images below ``ce_tau`` whose
  teacher argmax agrees with the synthesis label, the KD (soft label) keeps all.
* ``fa_weight`` x L_FA (HAST lam = 1000 on CIFAR, SynQ 4000 on ImageNet) [code: lihuantong/HAST
  trainer_direct.py]: sum over layers of mean((A_Q - A_f)^2), A = the L2-normalised channel attention
  (per-channel mean of squared activations, :func:`channel_attention`) of each residual block's
  branch output, the block's last BN (the official hooks: pytorchcv ``ResUnit.body``, ``conv3``
  of ``LinearBottleneck``), :func:`feature_layers`.
* ``adv_eps`` > 0: HAST's sample difficulty promotion [code: lihuantong/HAST trainer_direct.py]:
  x' = x + eps sign(grad_x L_S), with L_S = the weighted KD + CE + FA (+ BNS) on x and the gradient
  through student *and* teacher as in the official code; the loss adds ``adv_weight`` (SynQ
  ``lambda_pert`` = 1) x L_S(x'), the teacher on x' without gradient, the CE samples of x. HAST and
  SynQ: eps = 0.01 in the normalised input space. (SynQ's CIFAR branch leaves FA out of L_S(x');
  here L_S(x') always has the terms of L_S.)
* ``lpf_d0`` > 0: SynQ's low-pass filter on every batch, after the augmentation [code:
  snudm-starlab/SynQ trainer_direct.py ``apply_filters``]: the centred 2D spectrum times
  exp(-D^2 / (2 D0^2)), D the distance to the DC bin (:func:`lowpass_filter`). ``lpf_d0`` is D0 for
  a 224-pixel side (SynQ's ImageNet value, 80) and scales with the side: D0 = 80 x 32 / 224 = 11.4
  on CIFAR, the same filter in normalised frequency (a Gaussian blur of sigma = side / (2 pi D0) =
  0.45 px at both sizes, 37% gain at Nyquist); 80 unscaled would keep >= 96% of every frequency of
  a 32-pixel image, i.e. no filter.
* ``cam_weight`` x MSE(CAM_f(x), CAM_Q(x)) (SynQ ``lambda_cam``: 200 argparse default, 50 in its
  ImageNet run script) [code: snudm-starlab/SynQ gradcam.py]: Grad-CAM at the last Conv2d's output
  for each model's own top class (:func:`grad_cam`); the gradient weights are constants (no double
  backward), the student map is differentiable through its activations.
* ``mixup_weight`` x KD(Q(x_mix), f(x_mix)) (TexQ's mixup-based distillation [paper; details
  unverified]): x_mix = lam x + (1 - lam) x[perm], one lam ~ Beta(``mixup_alpha``, ``mixup_alpha``)
  per batch (standard mixup).

The warm-up measures these terms too (every epoch's history has the same keys; with ``adv_eps`` or
``cam_weight`` its steps run with autograd, without an update); the EMA activation ranges follow
only the student's forward on the batch itself (not x' or x_mix).

**Determinism and resume.** Every random draw of step ``s`` of epoch ``e`` (batch indices, crops,
flips, mixup pairs and weights) comes from a ``torch.Generator`` seeded with a hash of ``(seed, e,
s)``; nothing else is random. ``ckpt_dir/qat.pt`` (atomic, SHA-256 trailer) is rewritten after every
epoch with the model, the optimizer state, the EMA observers and the loss history, under a
fingerprint of the config, the seed, the initial student, the images and the labels;
``resume=True`` continues from it and ends with tensors equal to an uninterrupted run. Ctrl-C
finishes the current step, writes the checkpoint at that step and raises ``KeyboardInterrupt`` (a
second Ctrl-C stops at once, leaving the last epoch's checkpoint).

**Data parallelism** (``ddp=True``; ``torchrun --nproc-per-node N -m zsq quantize ...`` with the
``qat-kd`` quantizer, :mod:`zsq.distributed`). Every rank draws the step's *global* batch from the
step's generator exactly as one process does (indices, crop boxes and flips, mixup pairing) and
takes its rows (contiguous, sizes differing by at most one); only those rows are augmented and run
through teacher and student. The rank's loss (a mean over its rows) is scaled by its share of the
batch and backpropagated locally, then the gradients are summed over the ranks in one flat
all-reduce before the optimizer step, so every rank applies the global batch's gradient to identical
weights (SGD state, weight ranges and BN stay identical without further traffic). Explicit
all-reduce rather than ``DistributedDataParallel``: a step may run the student several times before
one backward (HAST's x', TexQ's mixed batch) and take ``autograd.grad`` in between (the input
gradient, Grad-CAM), which DDP's reducer (one forward per backward) does not allow; DDP would also
re-broadcast the quantizers' buffers at every forward and prefix the state-dict names; the hooks and
the fused activation quantizer work on the bare module unchanged. During the warm-up each
activation quantizer's EMA hook all-reduces ``[-min, max]`` of its input (MAX), so every observer
sees the global batch's min/max (exact) and the ranges are the same on every rank. The loss terms
reported per step and in the history are the global batch's (rank means weighted by their shares,
all-reduced together with a Ctrl-C flag, so every rank stops at the same step). Rank 0 broadcasts the
images, labels and initial student at the start, reads the checkpoint on ``resume`` and broadcasts
it, computes PLF's reliability filter (once, on the set) and alone writes the checkpoint (the others
wait on a barrier).

*What equals the one-process run*: the same global batches, ranges and updates, up to floating
point: a sum of per-rank means in place of one mean (reduction order), and the convolutions of a
smaller batch may round differently; a fake-quantized value next to a rounding boundary can then
land one level apart, so the weights agree to a tolerance, not bitwise (tests/test_distributed.py:
2 ranks vs 1 process with every method term on, 5 training steps: the weights' difference is 5e-7
of their update, tested below 1e-4). Every term is a mean over samples with per-sample inputs (KD,
CE and its ``easy`` / ``reliable`` selections, FA, Grad-CAM, HAST's x', whose input-gradient sign
is per sample; TexQ's partners are drawn globally and augmented by the rank that needs them), so it
splits exactly, except ``bns_weight``: the student's BN-input statistics of the whole batch are not
a mean of per-rank terms, and it is refused under more than one process. Not split: the per-step
batch draw and PLF's one-off filter (rank 0); the global batch must hold at least one image per rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
import torch.nn.functional as F

from .. import distributed as zdist
from ..config import to_bool, to_float, to_int
from ..data.augment import resample_box_flip
from ..errors import BadValueError
from ..quant.modules import QUANT_LAYERS, Quantizer
from ..quant.observers import Observer
from ..quant.protocol import frozen_fp_copy
from ..record import record_of
from ..train import (Fingerprint, NestedBar, cosine_lr, deferred_sigint, derive_seed, read_checkpoint,
                     seeded_generator, state_copy, stop_if_interrupted, write_checkpoint)

CKPT_NAME = "qat.pt"
CKPT_FORMAT = "zsq-qat-1"
KD_REDUCTIONS = ("batchmean", "mean")
PRECISIONS = ("fp32", "bf16")
#: fraction of the steps with EMA activation ranges when the run has no more epochs than ``ema_epochs``
EMA_FRACTION = 0.02
CE_TARGETS = ("labels", "teacher")
CE_SELECTS = ("all", "easy", "reliable")
_LOSS_WEIGHTS = ("kd_weight", "ce_weight", "bns_weight", "fa_weight", "cam_weight", "mixup_weight")
_METHOD_FLOATS = ("ce_tau", "fa_weight", "adv_eps", "adv_weight", "lpf_d0", "cam_weight", "mixup_weight",
                  "mixup_alpha")
#: fields added with the method terms: left out of the resume fingerprint at their default (off), so
#: checkpoints written before they existed still resume
_METHOD_FIELDS = ("ce_target", "ce_select") + _METHOD_FLOATS


@dataclass
class QATConfig:
    """Hyperparameters of the fine-tuning loop. Defaults = the fixed-set GDFQ lineage on CIFAR
    [code: zysxmu/IntraQ cifar10_resnet20.hocon, trainer_direct.py] (module docstring).

    ``epochs`` x ``steps_per_epoch`` steps of ``batch_size`` images (an "epoch" is 200 iterations
    in the official trainers, not a pass over the set). ``lr`` peaks the cosine schedule; SGD with
    ``momentum``, ``nesterov`` and ``weight_decay``. Loss weights: ``kd_weight`` (alpha), with
    ``temperature`` T and ``kd_reduction`` (``batchmean``: IntraQ/HAST/SynQ; ``mean``: GDFQ's
    elementwise mean), ``ce_weight`` (CE on ``ce_target``: the synthesis labels, else the teacher's
    argmax; ``ce_select`` / ``ce_tau``: SynQ's easy samples or PLF's reliable ones), ``bns_weight``
    (student BN-input statistics, ``bns_variant`` of :data:`zsq.synth.losses.BNS_VARIANTS`).
    Method terms, all off by default (module docstring, with sources): ``fa_weight`` (HAST feature
    alignment), ``adv_eps`` / ``adv_weight`` (HAST sample difficulty promotion), ``lpf_d0`` (SynQ
    low-pass filter, D0 at 224 px), ``cam_weight`` (SynQ Grad-CAM alignment), ``mixup_weight`` /
    ``mixup_alpha`` (TexQ mixup KD). ``clip_images``: clamp the synthetic set once to the pixel range
    the model's normalisation can produce, ``[(0 - mean) / std, (1 - mean) / std]`` (zsq's option: the
    unclipped sets of the HAST lineage reach |x| ~ 9; clamping texq's raised its validation top-1 by ~6
    points, the suspected cause being outliers that widen the EMA activation ranges; the teacher sees the
    same clamped images, so KD stays consistent). ``ema_epochs``: warm-up epochs with EMA activation ranges
    (``ema_momentum``) and no training; frozen ranges after. ``augment``: per-image random resized
    crop (``crop_scale`` of the area) + horizontal flip. ``precision``: ``fp32`` | ``bf16`` (autocast
    of the teacher and student forwards; losses and activation fake-quantization in fp32);
    ``channels_last``: NHWC batches and weights.
    """

    epochs: int = 151  # IntraQ cifar*.hocon nEpochs (ImageNet: 151 too; SynQ 101)
    steps_per_epoch: int = 200  # trainer_direct.py: iters = 200
    batch_size: int = 256  # batchSize (ImageNet 16)
    lr: float = 1e-4  # lr_S (ImageNet 1e-6)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    temperature: float = 20.0
    kd_weight: float = 20.0  # alpha
    kd_reduction: str = "batchmean"
    ce_weight: float = 0.0
    bns_weight: float = 0.0
    bns_variant: str = "gdfq"
    ema_epochs: int = 4  # main_direct.py: unfreeze_model while epoch < 4
    ema_momentum: float = 0.9  # QuantAct beta
    augment: bool = True  # main_direct.py direct_dataset: RandomResizedCrop(scale (0.5, 1)) + flip
    crop_scale: tuple[float, float] = (0.5, 1.0)
    precision: str = "fp32"
    channels_last: bool = True  # ResNet-20, batch 256, fp32, 1 thread: 1.29 vs 1.50 s/step (13% faster)
    # method-specific terms (module docstring); the defaults switch them off
    ce_target: str = "labels"  # labels (GDFQ, IntraQ; teacher argmax without labels) | teacher
    ce_select: str = "all"  # all | easy (SynQ selective CE) | reliable (PLF, unverified)
    ce_tau: float = 0.5  # SynQ tau_selce; PLF: normalised self-entropy threshold (zsq's choice)
    fa_weight: float = 0.0  # HAST lam (CIFAR 1000; SynQ ImageNet 4000)
    adv_eps: float = 0.0  # HAST / SynQ eps 0.01
    adv_weight: float = 1.0  # SynQ lambda_pert (HAST: 1)
    lpf_d0: float = 0.0  # SynQ d_zero 80 at 224 px (scaled with the image side)
    cam_weight: float = 0.0  # SynQ lambda_cam (200 default, 50 in run_imagenet.sh)
    mixup_weight: float = 0.0  # TexQ mixup KD (unverified)
    mixup_alpha: float = 1.0  # Beta(alpha, alpha) of the mixup weight
    clip_images: bool = False  # clamp the set to the valid normalised pixel range once, before training (zsq)

    def __post_init__(self):
        for name in ("epochs", "steps_per_epoch", "batch_size", "ema_epochs"):
            setattr(self, name, to_int(getattr(self, name), name))
        for name in ("lr", "momentum", "weight_decay", "temperature", "kd_weight", "ce_weight", "bns_weight",
                     "ema_momentum") + _METHOD_FLOATS:
            setattr(self, name, to_float(getattr(self, name), name, finite=True))
        for name in ("nesterov", "augment", "channels_last", "clip_images"):
            setattr(self, name, to_bool(getattr(self, name), name))
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise BadValueError(f"epochs, steps_per_epoch and batch_size must be >= 1, got {self.epochs}, "
                                f"{self.steps_per_epoch}, {self.batch_size}")
        if self.ema_epochs < 0:
            raise BadValueError(f"ema_epochs must be >= 0, got {self.ema_epochs}")
        if self.lr < 0 or self.weight_decay < 0:
            raise BadValueError(f"lr and weight_decay must be >= 0, got {self.lr}, {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0 or not 0.0 < self.ema_momentum < 1.0:
            raise BadValueError(f"momentum must be in [0, 1) and ema_momentum in (0, 1), got {self.momentum}, "
                                f"{self.ema_momentum}")
        if self.nesterov and self.momentum == 0.0:
            raise BadValueError("nesterov needs momentum > 0 (set nesterov=false or a momentum)")
        if self.temperature <= 0:
            raise BadValueError(f"temperature must be > 0, got {self.temperature}")
        weights = {n: getattr(self, n) for n in _LOSS_WEIGHTS}
        if min(weights.values()) < 0:
            raise BadValueError("loss weights must be >= 0, got " + ", ".join(f"{n} {v}" for n, v in weights.items()))
        if not any(weights.values()):
            raise BadValueError("every loss weight is 0: set kd_weight, ce_weight or bns_weight > 0")
        for name, allowed in (("ce_target", CE_TARGETS), ("ce_select", CE_SELECTS)):
            if getattr(self, name) not in allowed:
                raise BadValueError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        if self.ce_select != "all" and self.ce_weight == 0:
            raise BadValueError(f"ce_select={self.ce_select} selects CE samples but ce_weight is 0: set ce_weight > 0")
        if not 0.0 < self.ce_tau <= 1.0:
            raise BadValueError(f"ce_tau must be in (0, 1], got {self.ce_tau}")
        if min(self.adv_eps, self.adv_weight, self.lpf_d0) < 0 or self.mixup_alpha <= 0:
            raise BadValueError(f"adv_eps, adv_weight and lpf_d0 must be >= 0 and mixup_alpha > 0, got "
                                f"{self.adv_eps}, {self.adv_weight}, {self.lpf_d0}, {self.mixup_alpha}")
        if self.kd_reduction not in KD_REDUCTIONS:
            raise BadValueError(f"kd_reduction must be one of {', '.join(KD_REDUCTIONS)}, got '{self.kd_reduction}'")
        if self.precision not in PRECISIONS:
            raise BadValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        from ..synth.losses import BNS_VARIANTS

        if self.bns_variant not in BNS_VARIANTS:
            raise BadValueError(f"bns_variant must be one of {', '.join(BNS_VARIANTS)}, got '{self.bns_variant}'")
        try:
            lo, hi = (float(v) for v in self.crop_scale)
        except (TypeError, ValueError):
            raise BadValueError(f"crop_scale expects two numbers [lo, hi], got {self.crop_scale!r}") from None
        if not 0.0 < lo <= hi <= 1.0:
            raise BadValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got [{lo}, {hi}]")
        self.crop_scale = (lo, hi)
        if self.total_steps <= self.ema_steps:
            raise BadValueError(f"{self.total_steps} steps leave none to train after {self.ema_steps} EMA warm-up "
                                "steps: raise epochs or steps_per_epoch, or lower ema_epochs")

    @classmethod
    def from_hparams(cls, hp: dict[str, Any] | None) -> QATConfig:
        """The config with the fields present in ``hp`` (recipe hparams; other keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (hp or {}).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def ema_steps(self) -> int:
        """Steps (from the first) with EMA activation ranges: ``ema_epochs`` epochs, or 2% of the
        steps when the run has no more epochs than that; at least one (the ranges start there)."""
        if self.epochs > self.ema_epochs:
            return max(1, self.ema_epochs * self.steps_per_epoch)
        return max(1, math.ceil(EMA_FRACTION * self.total_steps))


def _as(kind: type, value: Any, name: str):
    """Old name of the shared converter (:mod:`zsq.config`), kept for code that still imports it."""
    return to_int(value, name) if kind is int else to_float(value, name, finite=True)


_as_bool = to_bool  # old name, kept for code that still imports it


class QATInterrupted(Exception):
    """Raised at ``stop_at`` (tests) after the checkpoint is written."""


class Batch(NamedTuple):
    """One step's draw: images (augmented, filtered), their labels, their indices in the set, and the
    mixup pairing ``(perm, lam)`` (a data-parallel rank's slice: ``(partner images, lam)``, since
    ``perm`` pairs rows across the ranks' slices)."""

    x: Tensor
    labels: Tensor | None
    idx: Tensor
    mix: tuple[Tensor, float] | None


class _Pass(NamedTuple):
    """Teacher and student logits of one forward pair and what the hooks recorded."""

    t: Tensor
    s: Tensor
    fa_t: list[Tensor]
    fa_s: list[Tensor]
    cam_t: list[Tensor]
    cam_s: list[Tensor]


# --------------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------------
def step_seed(seed: int, epoch: int, step: int) -> int:
    """A 63-bit seed for step ``step`` of epoch ``epoch`` of run ``seed`` (independent of other steps)."""
    return derive_seed("zsq-qat", seed, epoch, step)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float, reduction: str = "batchmean") -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` in fp32.

    ``batchmean``: summed over classes, averaged over the batch (IntraQ/HAST/SynQ);
    ``mean``: averaged over batch *and* classes, i.e. ``batchmean / num_classes`` (``KLDivLoss()``'s
    default, GDFQ/Qimera/AIT).
    """
    t = float(temperature)
    log_q = F.log_softmax(student.float() / t, dim=1)
    p = F.softmax(teacher.float() / t, dim=1)
    kl = F.kl_div(log_q, p, reduction="batchmean") * (t * t)
    return kl / student.shape[1] if reduction == "mean" else kl


def random_resized_crop_flip(x: Tensor, generator: torch.Generator | None,
                             scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             *, u: Tensor | None = None) -> Tensor:
    """Per image: a random crop box covering ``scale`` of the area with aspect ratio in ``ratio``
    (log-uniform), resized back to the full size (bilinear), mirrored with probability 0.5: IntraQ's
    ``RandomResizedCrop(scale=(0.5, 1)) + RandomHorizontalFlip()``, batched as one affine resampling
    (box sides clipped to the image instead of torchvision's rejection loop). Draws 5 uniforms per
    image from ``generator``, or takes them from ``u`` (B, 5) (a rank's rows of a global draw)."""
    b = x.shape[0]
    if u is None:
        u = torch.rand(b, 5, generator=generator, device=generator.device)
    u = u.to(x.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[:, 1])
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # box width / image width
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    # box centre in normalised coordinates
    return resample_box_flip(x.float(), w, h, (2.0 * u[:, 2] - 1.0) * (1.0 - w), (2.0 * u[:, 3] - 1.0) * (1.0 - h),
                             flip, padding_mode="border")


def channel_attention(a: Tensor) -> Tensor:
    """HAST's channel attention of a (B, C, H, W) activation: the per-channel mean of the squared
    activation, L2-normalised over the channels of each sample (B, C), in fp32."""
    return F.normalize(a.float().pow(2).mean((2, 3)).flatten(1), dim=1)


def lowpass_filter(x: Tensor, d0: float) -> Tensor:
    """SynQ's Gaussian low-pass filter: the 2D spectrum of each image channel, centred, times
    ``exp(-D^2 / (2 d0^2))`` with ``D`` the distance (in frequency bins) to the DC bin at
    ``(H // 2, W // 2)``; the real part of the inverse transform."""
    h, w = x.shape[-2:]
    d2 = ((torch.arange(h, device=x.device) - h // 2).pow(2)[:, None]
          + (torch.arange(w, device=x.device) - w // 2).pow(2)[None, :]).float()
    gain = torch.exp(-d2 / (2.0 * float(d0) ** 2))
    spec = torch.fft.fftshift(torch.fft.fft2(x.float(), dim=(-2, -1)), dim=(-2, -1)) * gain
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1)), dim=(-2, -1)).real


def grad_cam(logits: Tensor, act: Tensor, size: tuple[int, int], eps: float = 1e-10) -> Tensor:
    """SynQ's Grad-CAM map (B, 1, H, W) of ``act`` (the target layer's output, in ``logits``'
    graph) for each sample's own top class: channel weights = the spatial mean of the gradient of
    the top logit, clamped at ``eps`` (SynQ's clamp: no negative weights); ReLU of the weighted sum
    of channels, bilinear upsampling to ``size``, min-max normalisation per sample. The weights are
    constants (no double backward); the map is differentiable through ``act``."""
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (g,) = torch.autograd.grad(score, act, retain_graph=True)
    weights = g.float().mean((2, 3), keepdim=True).clamp(min=eps)
    cam = F.relu((weights * act.float()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    lo, hi = cam.amin((2, 3), keepdim=True), cam.amax((2, 3), keepdim=True)
    return (cam - lo) / (hi - lo + eps)


def masked_ce(logits: Tensor, target: Tensor, keep: Tensor | None = None) -> Tensor:
    """Cross-entropy summed over the samples with ``keep`` (all when ``None``), divided by the batch
    size (SynQ's selective CE, without the constant its masked rows add)."""
    if keep is None:
        return F.cross_entropy(logits, target)
    return (F.cross_entropy(logits, target, reduction="none") * keep).sum() / logits.shape[0]


def normalized_entropy(logits: Tensor) -> Tensor:
    """Self-entropy of ``softmax(logits)`` divided by log(C): 0 = one-hot, 1 = uniform (PLF's
    reliability metric, normalised so one threshold fits any class count)."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1) / math.log(logits.shape[1])


_SHORTCUT_NAMES = ("shortcut", "downsample", "identity")


def feature_layers(model: nn.Module) -> list[str]:
    """HAST's feature-alignment sites: for every residual block (:func:`zsq.quant.graph.is_block`),
    its last BatchNorm2d outside the shortcut (named ``shortcut`` / ``downsample`` / ``identity``
    ...), whose output is the residual branch before the addition (pytorchcv ``ResUnit.body``)."""
    from ..quant.graph import is_block

    names = []
    for bname, block in model.named_modules():
        if not bname or not is_block(block):
            continue
        last = None
        for n, m in block.named_modules():
            if isinstance(m, nn.BatchNorm2d) and not any(k in n.lower() for k in _SHORTCUT_NAMES):
                last = f"{bname}.{n}"
        if last is not None and not any(last.startswith(p + ".") for p in names):
            names.append(last)
    return names


def cam_layer(model: nn.Module) -> str | None:
    """SynQ's Grad-CAM target: the last Conv2d of the model in registration order."""
    return next((n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Conv2d)), None)


class _Recorder:
    """Forward hooks on named modules of a model keeping each output, transformed (``fn``), in call
    order; ``leaf=True`` makes an output that needs no gradient a leaf that does, while autograd is
    on (so Grad-CAM can differentiate the frozen teacher's logits w.r.t. it)."""

    def __init__(self, model: nn.Module, names: list[str], fn: Callable[[Tensor], Tensor] | None = None,
                 leaf: bool = False):
        self.mods = [model.get_submodule(n) for n in names]
        self.fn, self.leaf = fn, leaf
        self.out: list[Tensor] = []
        self.handles: list[Any] = []

    def _hook(self, mod, args, out):
        if self.leaf and torch.is_grad_enabled() and not out.requires_grad:
            out = out.detach().requires_grad_()
        self.out.append(self.fn(out) if self.fn is not None else out)
        return out

    def register(self) -> None:
        self.handles = [m.register_forward_hook(self._hook) for m in self.mods]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.out = [], []

    def take(self) -> list[Tensor]:
        out, self.out = self.out, []
        return out


def refresh_weight_ranges(model: nn.Module) -> None:
    """Every quantized layer's weight range = the per-channel min-max of its current weights."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QUANT_LAYERS) and isinstance(m.wq, Quantizer):
                m.wq.init_from_tensor(m.weight.detach(), "minmax")


def _act_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer) and not n.endswith("wq")]


def _fingerprint(student: nn.Module, images: Tensor, cfg: QATConfig, seed: int, labels: Tensor | None = None) -> str:
    layout = record_of(student).layout
    default = QATConfig.__dataclass_fields__
    config = {k: v for k, v in cfg.to_dict().items() if k not in _METHOD_FIELDS or v != default[k].default}
    h = Fingerprint().settings({"config": config, "seed": int(seed),
                                "layout": layout.to_dict() if layout is not None else None})
    h.state(student.state_dict()).tensor(images)
    if labels is not None:
        h.raw(b"labels:" + labels.detach().to(torch.int64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _fused_act_quant(aqs: list[tuple[str, Quantizer]]):
    """While inside, per-tensor activation quantizers with a fixed step fake-quantize through torch's
    fused ``fake_quantize_per_tensor_affine`` also when a gradient is needed (the :class:`Quantizer`
    uses that kernel only without one). Forward values are bit-identical to
    :func:`zsq.quant.fake.fake_quant`, computed in fp32 also under bf16 autocast; the gradient is
    the same straight-through estimator, masked where the rounded code falls outside the grid
    (``fake_quant`` masks where the unrounded value does: they differ within half a step of the
    range ends). Forward + backward of one 256x16x32x32 activation, 1 thread: 55-80 ms through
    ``Quantizer.forward``, 22 ms fused (ResNet-20 has 19 such quantizers: ~0.4 s of a 1.5 s step).
    Anything else (LSQ steps, QDrop, observe / off modes) goes through ``Quantizer.forward``."""
    patched = []
    for _, q in aqs:
        if q.per_channel:
            continue

        def forward(x: Tensor, q: Quantizer = q) -> Tensor:
            if q.mode != "quant" or isinstance(q.scale, nn.Parameter) or (q.training and q.drop_prob > 0):
                return Quantizer.forward(q, x)
            zp = q.zero_point.round().to(torch.int32).reshape(())
            return torch.fake_quantize_per_tensor_affine(x.float(), q.scale.detach().reshape(()).float(), zp,
                                                         q.qmin, q.qmax)

        q.forward = forward  # instance attribute: hooks still run, the module tree is unchanged
        patched.append(q)
    try:
        yield
    finally:
        for q in patched:
            del q.forward


# --------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------
class QATTrainer:
    """Fine-tunes ``student`` (fresh from ``apply_protocol``: activation quantizers not calibrated) in
    place by distillation from ``teacher`` on ``images``; see the module docstring.

    ``labels``: optional synthesis labels aligned with ``images`` (int, shape (N,)), used by the CE
    terms. ``stop_at=(epoch, k)``: write the checkpoint after step ``k`` (1-based) of ``epoch``
    (0-based) and raise :class:`QATInterrupted` (tests); ``callback(epoch, step, loss)`` runs after
    every step. ``ddp=True``: data-parallel over the ranks of the initialised ``torch.distributed``
    process group (module docstring, "Data parallelism").
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, images: Tensor, cfg: QATConfig, *, seed: int = 0,
                 progress: bool = True, ckpt_dir: str | Path | None = None, resume: bool = False,
                 stop_at: tuple[int, int] | None = None,
                 callback: Callable[[int, int, float], None] | None = None, labels: Tensor | None = None,
                 ddp: bool = False):
        if images is None or not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] < 1:
            raise BadValueError("QAT needs training images (a synthesizer, --synthetic or --calib)")
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != images.shape[:1]
                                   or labels.is_floating_point()):
            raise BadValueError(f"labels must be an integer tensor of shape ({images.shape[0]},), one per image, "
                                f"got {getattr(labels, 'dtype', type(labels).__name__)} "
                                f"{tuple(getattr(labels, 'shape', ()))}")
        self.cfg = cfg
        self.q = student
        self.images = images.detach().float().cpu()
        if cfg.clip_images:
            from ..synth.pixel import pixel_range

            lo, hi = pixel_range(teacher, self.images.shape[1])
            self.images = self.images.clamp(lo, hi)
        self.labels = labels.detach().to(torch.int64).cpu() if labels is not None else None
        self.seed = int(seed)
        self.device = next((p.device for p in student.parameters()), torch.device("cpu"))
        self.rank, self.world = 0, 1
        if ddp:
            self._ddp_setup(student, cfg)
        self.progress = progress and self.rank == 0
        self.ckpt = Path(ckpt_dir) / CKPT_NAME if ckpt_dir else None
        self.resume = resume
        self.stop_at = tuple(int(v) for v in stop_at) if stop_at is not None else None
        self.callback = callback
        self.steps_run = 0
        self.history: list[dict[str, Any]] = []

        self.aqs = _act_quantizers(student)
        for _, q in self.aqs:
            q.observer = None
            q.mode = "quant"  # ranges come from the EMA hook during the first steps
        self.fingerprint = _fingerprint(student, self.images, cfg, self.seed, self.labels)
        self.teacher = frozen_fp_copy(teacher)
        student.eval()  # BN statistics frozen; BN affine parameters are trained
        self.params = [p for p in student.parameters()]
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                   weight_decay=cfg.weight_decay)
        self._ema_on = False
        self._hooks: list[Any] = []
        self.bns = None
        if cfg.bns_weight > 0:
            from ..synth.losses import BNStatsLoss, bn_layers

            if not bn_layers(student):
                proto = getattr(record_of(student).layout, "protocol", "?")
                raise BadValueError(f"bns_weight > 0 needs BatchNorm layers in the student, but protocol {proto} "
                                    "folds them (use --protocol qat or bns_weight=0)")
            self.bns = BNStatsLoss.preset(cfg.bns_variant, student, input_prior=False)
        # method terms: hooks on the same layer names of teacher and student (registered by run())
        self.fa: tuple[_Recorder, _Recorder] | None = None
        if cfg.fa_weight > 0:
            names = feature_layers(self.teacher)
            if not names:
                raise BadValueError("fa_weight > 0 needs residual blocks with BatchNorm (HAST's feature alignment "
                                    "sites); this model has none: set fa_weight=0")
            self.fa = (_Recorder(self.teacher, names, channel_attention), _Recorder(student, names, channel_attention))
        self.cam: tuple[_Recorder, _Recorder] | None = None
        if cfg.cam_weight > 0:
            name = cam_layer(self.teacher)
            if name is None:
                raise BadValueError("cam_weight > 0 needs a Conv2d (Grad-CAM's target layer): set cam_weight=0")
            self.cam = (_Recorder(self.teacher, [name], leaf=True), _Recorder(student, [name]))
        #: warm-up steps need autograd too (input gradient / Grad-CAM)
        self._autograd_terms = cfg.adv_eps > 0 or cfg.cam_weight > 0
        self.reliable = None
        if cfg.ce_select == "reliable":  # data-parallel: rank 0's filter on every rank
            self.reliable = zdist.rank0_call(self._reliable) if self.world > 1 else self._reliable()

    # -- data parallelism ----------------------------------------------------------------------------
    def _ddp_setup(self, student: nn.Module, cfg: QATConfig) -> None:
        """Rank and world size; refuse what cannot be split; rank 0's images, labels and student
        tensors on every rank; this rank's rows of every global batch."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ddp=True needs an initialised torch.distributed process group "
                               "(zsq.distributed.process_group, under torchrun)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cfg.bns_weight > 0:
            raise BadValueError("bns_weight > 0 matches the statistics of the whole batch, which cannot be split "
                                f"over {self.world} processes: set bns_weight=0 or run in one process")
        self.images, self.labels = zdist.broadcast_data(self.images, self.labels, self.device)
        b = min(cfg.batch_size, self.images.shape[0])
        if b < self.world:
            raise BadValueError(f"a batch of {b} images cannot be split over {self.world} processes: raise "
                                "batch_size (or the image count) or use fewer processes")
        zdist.broadcast_tensors(v for v in student.state_dict().values() if isinstance(v, Tensor))
        self._rows = zdist.share(b, self.rank, self.world)
        #: this rank's share of the global batch: its loss (a mean over its rows) is scaled by it, so
        #: the summed gradients are those of the global batch's mean
        self._weight = (self._rows.stop - self._rows.start) / b

    # -- EMA activation ranges -------------------------------------------------------------------------
    def _ema_hook(self, mod: Quantizer, args) -> None:
        if not self._ema_on:
            return
        if mod.observer is None:
            mod.observer = Observer("ema", momentum=self.cfg.ema_momentum)
        x = args[0].detach()
        if self.world > 1:  # the global batch's min and max (exact), so every rank's observer is the same
            x = zdist.global_min_max(x)
        mod.observer.update(x)
        mod.set_range(mod.observer.lo, mod.observer.hi)

    def _observer_state(self) -> dict[str, dict[str, Any]]:
        out = {}
        for n, q in self.aqs:
            o = q.observer
            if o is not None and o.lo is not None:
                out[n] = {"lo": o.lo.clone(), "hi": o.hi.clone(), "elo": o._elo.clone(), "ehi": o._ehi.clone(),
                          "steps": int(o.steps)}
        return out

    def _load_observers(self, state: dict[str, dict[str, Any]]) -> None:
        for n, q in self.aqs:
            s = state.get(n)
            if s is None:
                q.observer = None
                continue
            o = Observer("ema", momentum=self.cfg.ema_momentum)
            o.lo, o.hi, o._elo, o._ehi, o.steps = s["lo"], s["hi"], s["elo"], s["ehi"], int(s["steps"])
            q.observer = o

    # -- checkpoints ---------------------------------------------------------------------------------
    #: checkpoint format tag and the name errors use; subclasses that add state (the generator loop)
    #: override these and :meth:`_ckpt_extra` / :meth:`_ckpt_restore`
    ckpt_format = CKPT_FORMAT
    ckpt_what = "QAT checkpoint"

    def _ckpt_extra(self) -> dict[str, Any]:
        """Further entries of the checkpoint (none here)."""
        return {}

    def _ckpt_restore(self, ck: dict[str, Any]) -> None:
        """Restore what :meth:`_ckpt_extra` saved (nothing here)."""

    def _save(self, epoch: int, step: int, acc: dict[str, float]) -> None:
        """Write the checkpoint (data-parallel: rank 0 writes, every rank waits for it)."""
        if self.ckpt is None:
            return
        if self.rank == 0:
            write_checkpoint(self.ckpt, self.ckpt_format, self.fingerprint, {
                "epoch": epoch, "step": step, "model": state_copy(self.q), "optimizer": self.opt.state_dict(),
                **self._ckpt_extra(), "observers": self._observer_state(), "history": self.history, "acc": acc})
        if self.world > 1:
            dist.barrier()

    def _read_ckpt(self) -> dict | None:
        return read_checkpoint(self.ckpt, self.ckpt_what, self.ckpt_format, self.fingerprint)

    def _load(self) -> dict | None:
        """The checkpoint to resume from, or ``None`` (data-parallel: rank 0 reads it, every rank gets it)."""
        if self.ckpt is None or not self.resume:
            return None
        ck = zdist.rank0_call(self._read_ckpt) if self.world > 1 else self._read_ckpt()
        if ck is not None:
            self._ckpt_restore(ck)
        return ck

    # -- one step ------------------------------------------------------------------------------------
    def _draw(self, epoch: int, step: int) -> Batch:
        """Batch ``step`` of ``epoch``: images drawn without replacement (with their labels), augmented,
        low-pass filtered, and the mixup pairing; every draw from the step's own generator."""
        cfg = self.cfg
        g = seeded_generator(step_seed(self.seed, epoch, step))
        n = self.images.shape[0]
        idx = torch.randperm(n, generator=g)[: min(cfg.batch_size, n)]
        b = idx.shape[0]
        u = torch.rand(b, 5, generator=g) if cfg.augment else None  # crop boxes and flips of the global batch
        perm = lam = None
        if cfg.mixup_weight > 0:
            perm = torch.randperm(b, generator=g)
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
            lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format

        def images(rows: Tensor | slice) -> Tensor:
            x = self.images[idx[rows]]
            if u is not None:
                x = random_resized_crop_flip(x, None, cfg.crop_scale, u=u[rows])
            if cfg.lpf_d0 > 0:  # D0 given for a 224-pixel side, scaled with the image
                x = lowpass_filter(x, cfg.lpf_d0 * math.sqrt(x.shape[-2] * x.shape[-1]) / 224.0)
            return x.to(self.device).contiguous(memory_format=fmt)

        rows = self._rows if self.world > 1 else slice(0, b)  # a data-parallel rank: its rows only
        mix = None
        if perm is not None:  # the partners of a rank's rows may lie in other ranks' rows
            mix = (perm.to(self.device), lam) if self.world == 1 else (images(perm[rows]), lam)
        y = self.labels[idx[rows]].to(self.device) if self.labels is not None else None
        return Batch(images(rows), y, idx[rows], mix)

    def _batch(self, epoch: int, step: int) -> Tensor:
        return self._draw(epoch, step).x

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _recorders(self) -> list[_Recorder]:
        return [r for pair in (self.fa, self.cam) if pair is not None for r in pair]

    @contextlib.contextmanager
    def hooked(self):
        """While inside, the hooks the losses read are on: EMA activation ranges (active only while
        ``_ema_on``), the student's BN statistics, the feature-alignment and Grad-CAM layers."""
        self._hooks = [q.register_forward_pre_hook(self._ema_hook) for _, q in self.aqs]
        if self.bns is not None:
            self.bns.register()
        for r in self._recorders():
            r.register()
        try:
            yield self
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._ema_on = False
            if self.bns is not None:
                self.bns.remove()
            for r in self._recorders():
                r.remove()

    def _reliable(self) -> Tensor:
        """PLF's filter, once on the set as given (no augmentation): 1.0 for each image whose teacher
        self-entropy / log(C) is below ``ce_tau`` and whose teacher argmax is its synthesis label
        (when CE targets the labels), else 0.0."""
        keep = []
        for i in range(0, self.images.shape[0], 256):
            with torch.inference_mode():
                t = self.teacher(self.images[i:i + 256].to(self.device)).float().cpu()
            ok = normalized_entropy(t) < self.cfg.ce_tau
            if self.labels is not None and self.cfg.ce_target == "labels":
                ok &= t.argmax(1) == self.labels[i:i + 256]
            keep.append(ok)
        return torch.cat(keep).float()

    def _forward(self, x: Tensor, clean: bool) -> _Pass:
        """Teacher and student on ``x`` with what the hooks recorded. ``clean``: the batch itself: the
        teacher keeps its graph when a term differentiates through it, the EMA hooks may fire."""
        if clean and self._autograd_terms and torch.is_grad_enabled():
            with self._autocast():
                t = self.teacher(x).float()
            fresh = False
        else:
            with torch.inference_mode(), self._autocast():
                t = self.teacher(x)
            t = t.float().clone()  # a normal tensor (inference tensors cannot be saved for backward)
            fresh = True
        fa_t = self.fa[0].take() if self.fa is not None else []
        if fresh:
            fa_t = [a.clone() for a in fa_t]
        cam_t = self.cam[0].take() if self.cam is not None else []
        ema, self._ema_on = self._ema_on, self._ema_on and clean
        try:
            with self._autocast():
                s = self.q(x)
        finally:
            self._ema_on = ema
        fa_s = self.fa[1].take() if self.fa is not None else []
        cam_s = self.cam[1].take() if self.cam is not None else []
        if (self.fa is not None and not fa_s) or (self.cam is not None and not cam_s):
            raise RuntimeError("the feature-alignment / Grad-CAM hooks are off: call losses() inside trainer.hooked()")
        return _Pass(t, s.float(), fa_t, fa_s, cam_t, cam_s)

    def _student_loss(self, p: _Pass, target: Tensor, keep: Tensor | None) -> dict[str, Tensor]:
        """The weighted KD, CE, BNS and FA terms of one pass (``total`` = L_S)."""
        cfg = self.cfg
        out = {}
        total = torch.zeros((), device=p.s.device)
        if cfg.kd_weight > 0:
            out["kd"] = kd_loss(p.s, p.t, cfg.temperature, cfg.kd_reduction)
            total = total + cfg.kd_weight * out["kd"]
        if cfg.ce_weight > 0:
            out["ce"] = masked_ce(p.s, target, keep)
            total = total + cfg.ce_weight * out["ce"]
        if self.bns is not None:
            out["bns"] = self.bns.loss()
            total = total + cfg.bns_weight * out["bns"]
        if self.fa is not None:
            out["fa"] = sum((a_s - a_t).pow(2).mean() for a_s, a_t in zip(p.fa_s, p.fa_t))
            total = total + cfg.fa_weight * out["fa"]
        out["total"] = total
        return out

    def losses(self, x: Tensor, labels: Tensor | None = None, *, idx: Tensor | None = None,
               mix: tuple[Tensor, float] | None = None) -> dict[str, Tensor]:
        """The loss terms of the student on batch ``x`` (with gradients; ``labels`` / ``idx`` / ``mix``
        as :meth:`_draw` gives them); ``total`` is their weighted sum. Terms read by hooks need
        :meth:`hooked` (``run`` holds it)."""
        cfg = self.cfg
        if cfg.adv_eps > 0:
            x = x.detach().requires_grad_()
        p = self._forward(x, clean=True)
        target = labels if labels is not None and cfg.ce_target == "labels" else p.t.detach().argmax(1)
        keep = None
        if cfg.ce_select == "easy":  # SynQ: teacher difficulty 1 - p_y below tau
            p_y = F.softmax(p.t.detach(), dim=1).gather(1, target[:, None]).squeeze(1)
            keep = (1.0 - p_y < cfg.ce_tau).float()
        elif cfg.ce_select == "reliable":
            keep = self.reliable[idx].to(p.s.device)
        out = self._student_loss(p, target, keep)
        ls = out["total"]
        total = ls
        if self.cam is not None:
            size = tuple(x.shape[-2:])
            cam_t = grad_cam(p.t, p.cam_t[0], size).detach()
            out["cam"] = F.mse_loss(grad_cam(p.s, p.cam_s[0], size), cam_t)
            total = total + cfg.cam_weight * out["cam"]
        if cfg.adv_eps > 0:  # HAST: one signed-gradient step on the input, L_S again there
            (g,) = torch.autograd.grad(ls, x, retain_graph=True)
            pp = self._forward((x + cfg.adv_eps * g.sign()).detach(), clean=False)
            out["adv"] = self._student_loss(pp, target, keep)["total"]
            total = total + cfg.adv_weight * out["adv"]
        if mix is not None:  # TexQ: KD on mixed images
            perm, lam = mix
            xd = x.detach()
            partner = perm if perm.is_floating_point() else xd[perm]  # (partner images, lam): a rank's slice
            pm = self._forward(lam * xd + (1.0 - lam) * partner, clean=False)
            out["mix"] = kd_loss(pm.s, pm.t, cfg.temperature, cfg.kd_reduction)
            total = total + cfg.mixup_weight * out["mix"]
        out["total"] = total
        return out

    def lr_at(self, gstep: int) -> float:
        """The learning rate of global step ``gstep``: 0 during the EMA warm-up, then a cosine from
        ``lr`` over the training steps."""
        cfg = self.cfg
        if gstep < cfg.ema_steps:
            return 0.0
        return cosine_lr(cfg.lr, gstep - cfg.ema_steps, cfg.total_steps - cfg.ema_steps)

    def _step(self, epoch: int, step: int) -> dict[str, float]:
        """One step: an EMA warm-up step (activation ranges updated, losses measured, no update) or
        a training step (ranges frozen, SGD on the loss)."""
        cfg = self.cfg
        gstep = epoch * cfg.steps_per_epoch + step
        b = self._draw(epoch, step)
        refresh_weight_ranges(self.q)
        if gstep < cfg.ema_steps:
            self._ema_on = True
            try:
                # not inference_mode: the ranges set here are used with autograd later
                with contextlib.nullcontext() if self._autograd_terms else torch.no_grad():
                    terms = self.losses(b.x, b.labels, idx=b.idx, mix=b.mix)
            finally:
                self._ema_on = False
        else:
            for grp in self.opt.param_groups:
                grp["lr"] = self.lr_at(gstep)
            terms = self.losses(b.x, b.labels, idx=b.idx, mix=b.mix)
            self._update(terms["total"], gstep)
        self.steps_run += 1
        return {k: float(v.detach()) for k, v in terms.items()}

    def _update(self, loss: torch.Tensor, gstep: int) -> None:
        """One optimizer step on ``loss`` (this rank's batch mean): the global batch's gradient on every rank,
        then the same update everywhere. A non-finite loss (one process) or gradient (all-reduced, so every
        rank stops together) is a one-line :class:`BadValueError` naming the lr; else NaN weights would end
        in a cryptic error inside fake quantization."""
        if self.world == 1 and not torch.isfinite(loss):
            raise self._diverged(f"the student's loss is {float(loss.detach())}", gstep)
        self.opt.zero_grad(set_to_none=True)
        (loss * self._weight if self.world > 1 else loss).backward(inputs=self.params)  # not into the teacher
        if self.world > 1:
            zdist.all_reduce_grads(self.params)
            if not all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None):
                raise self._diverged("the student's gradient is not finite", gstep)
        self.opt.step()

    def _diverged(self, what: str, gstep: int) -> BadValueError:
        return BadValueError(f"{what} at iteration {gstep}: training diverged; lower the student lr (now "
                             f"{self.cfg.lr:g}, batch {self.cfg.batch_size})")

    def _sync_step(self, vals: dict[str, float], hit: bool) -> tuple[dict[str, float], bool]:
        """Data-parallel: the global batch's loss terms (this rank's means weighted by its share,
        summed) and whether any rank got a Ctrl-C, in one all-reduce; as given in one process."""
        if self.world == 1:
            return vals, hit
        keys = sorted(vals)
        out = zdist.all_reduce_sum([vals[k] * self._weight for k in keys] + [float(hit)], self.device)
        return dict(zip(keys, out[:-1])), out[-1] > 0

    # -- all epochs ----------------------------------------------------------------------------------
    def run(self) -> nn.Module:
        cfg = self.cfg
        start_epoch, start_step, acc = 0, 0, {}
        ck = self._load()
        if ck is not None:
            self.q.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            self._load_observers(ck["observers"])
            self.history = list(ck["history"])
            start_epoch, start_step, acc = int(ck["epoch"]), int(ck["step"]), dict(ck["acc"])
        if cfg.channels_last:
            self.q.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        t_run = time.perf_counter()
        try:
            with self.hooked(), deferred_sigint() as sigint, _fused_act_quant(self.aqs), \
                    NestedBar(self.progress, "qat epochs", cfg.epochs, start_epoch) as bar:
                for epoch in range(start_epoch, cfg.epochs):
                    first = start_step if epoch == start_epoch else 0
                    if epoch != start_epoch:
                        acc = {}
                    bar.start(f"  epoch {epoch + 1}", cfg.steps_per_epoch, first)
                    t0 = time.perf_counter()
                    for step in range(first, cfg.steps_per_epoch):
                        vals = self._step(epoch, step)
                        vals, sigint["hit"] = self._sync_step(vals, sigint["hit"])
                        for k, v in vals.items():
                            acc[k] = acc.get(k, 0.0) + v
                        acc["n"] = acc.get("n", 0.0) + 1
                        done = step + 1
                        bar.update(done, acc["total"] / acc["n"])
                        if self.callback is not None:
                            self.callback(epoch, step, vals["total"])
                        if done == cfg.steps_per_epoch:
                            self.history.append({
                                "epoch": epoch, **{k: round(v / acc["n"], 6) for k, v in acc.items() if k != "n"},
                                "lr_last": self.lr_at(epoch * cfg.steps_per_epoch + step),
                                "ema_steps": max(0, min(cfg.steps_per_epoch,
                                                        cfg.ema_steps - epoch * cfg.steps_per_epoch)),
                                "wall_s": round(time.perf_counter() - t0, 3)})
                            self._save(epoch + 1, 0, {})
                        if self.stop_at is not None and self.stop_at == (epoch, done):
                            if done != cfg.steps_per_epoch:
                                self._save(epoch, done, acc)
                            raise QATInterrupted(f"stopped after step {done} of epoch {epoch}")
                        stop_if_interrupted(sigint, None if done == cfg.steps_per_epoch
                                            else lambda: self._save(epoch, done, acc))
                    bar.end(self.history[-1]["total"] if self.history else None)
        finally:
            if cfg.channels_last:
                self.q.to(memory_format=torch.contiguous_format)
        # the finished model: weight ranges of the final weights, frozen activation ranges, no observers
        refresh_weight_ranges(self.q)
        for _, q in self.aqs:
            q.observer = None
            if not q.initialized:  # never reached by a forward (e.g. a branch the data never takes)
                q.mode = "off"
        self.q.eval()
        self.wall_s = time.perf_counter() - t_run
        return self.q


def qat_finetune(student: nn.Module, teacher: nn.Module, images: Tensor, cfg: QATConfig | None = None,
                 **kw) -> nn.Module:
    """Fine-tune ``student`` (fresh from ``apply_protocol``) in place by distillation from ``teacher`` on
    ``images``; see :class:`QATTrainer` for the keywords (``labels``: synthesis labels). The result's
    record carries ``methods["qat"]`` = the per-epoch mean losses, steps run in this call, EMA steps,
    ms per step, whether synthesis labels were given, and (``ce_select="reliable"``) the fraction of
    images PLF's filter keeps for the CE."""
    cfg = cfg or QATConfig()
    tr = QATTrainer(student, teacher, images, cfg, **kw)
    q = tr.run()
    info = record_of(q).methods["qat"] = {
        "epochs": tr.history, "steps_run": tr.steps_run, "ema_steps": cfg.ema_steps, "total_steps": cfg.total_steps,
        "ms_per_step": round(1000 * tr.wall_s / tr.steps_run, 1) if tr.steps_run else None,
        "labels": tr.labels is not None, "processes": tr.world}
    if tr.reliable is not None:
        info["ce_reliable"] = round(float(tr.reliable.mean()), 4)
    return q


def quantize_qat(ctx) -> nn.Module:
    """The registered quantizer ``qat-kd``: lay the model out by ``ctx.protocol`` (per-channel min-max
    weights), then :func:`qat_finetune` it on ``ctx.images`` (and ``ctx.labels``, the synthesis labels
    when the set has them) with the FP model as teacher (``ctx.hparams`` = :class:`QATConfig` fields;
    ``stop_at`` is a test hook)."""
    from ..quant.protocol import apply_protocol

    if ctx.images is None:
        raise BadValueError("the qat-kd quantizer needs training images (a synthesizer, --synthetic or --calib)")
    hp = dict(ctx.hparams or {})
    cfg = QATConfig.from_hparams(hp)
    student = apply_protocol(ctx.model, ctx.protocol, ctx.w_bits, ctx.a_bits, policy=ctx.policy,
                             w_observer="minmax", a_observer="minmax", strict=ctx.strict)
    stop_at = hp.get("stop_at")
    ddp = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return qat_finetune(student, ctx.model, ctx.images, cfg, seed=ctx.seed, progress=ctx.progress,
                        ckpt_dir=ctx.ckpt_dir, resume=ctx.resume, labels=getattr(ctx, "labels", None),
                        stop_at=tuple(stop_at) if stop_at is not None else None, ddp=ddp)
