"""The hyperparameters of the QAT fine-tuning loop (:class:`QATConfig`; :mod:`zsq.qat.engine` runs it): a
:class:`zsq.config.Config` (``from_dict`` / ``from_hparams`` / ``to_dict``), each field's allowed strings and
lower bound in its metadata; the cross-field rules in ``__post_init__``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Config, setting, to_bool, to_float, to_int
from ..errors import BadValueError
from ..synth.losses import BNS_VARIANTS

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
class QATConfig(Config):
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

    epochs: int = setting(151, minimum=1)  # IntraQ cifar*.hocon nEpochs (ImageNet: 151 too; SynQ 101)
    steps_per_epoch: int = setting(200, minimum=1)  # trainer_direct.py: iters = 200
    batch_size: int = setting(256, minimum=1)  # batchSize (ImageNet 16)
    lr: float = 1e-4  # lr_S (ImageNet 1e-6)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    temperature: float = 20.0
    kd_weight: float = 20.0  # alpha
    kd_reduction: str = setting("batchmean", choices=KD_REDUCTIONS)
    ce_weight: float = 0.0
    bns_weight: float = 0.0
    bns_variant: str = setting("gdfq", choices=tuple(BNS_VARIANTS))
    ema_epochs: int = 4  # main_direct.py: unfreeze_model while epoch < 4
    ema_momentum: float = 0.9  # QuantAct beta
    augment: bool = True  # main_direct.py direct_dataset: RandomResizedCrop(scale (0.5, 1)) + flip
    crop_scale: tuple[float, float] = (0.5, 1.0)
    precision: str = setting("fp32", choices=PRECISIONS)
    channels_last: bool = True  # ResNet-20, batch 256, fp32, 1 thread: 1.29 vs 1.50 s/step (13% faster)
    # method-specific terms (module docstring); the defaults switch them off
    # labels (GDFQ, IntraQ; teacher argmax without labels) | teacher
    ce_target: str = setting("labels", choices=CE_TARGETS)
    ce_select: str = setting("all", choices=CE_SELECTS)  # all | easy (SynQ selective CE) | reliable (PLF, unverified)
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
