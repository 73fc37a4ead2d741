"""Label-conditioned BN-statistics inversion: ``deepinversion``, ``mixmix``, ``kw``, ``gznq``.

All four run the shared pixel loop (:class:`~zsq.synth.pixel.PixelSynthesizer`) with random target
labels and a cross-entropy term; they differ in the BNS form, the priors and the models inverted.

``deepinversion`` -- DeepInversion (Yin et al., CVPR 2020). Source: NVlabs/DeepInversion
``deepinversion.py`` (``DeepInversionClass.get_images``), ``imagenet_inversion.py`` (argument
defaults), ``utils/utils.py`` (``lr_cosine_policy``, ``clip``):

* loss = ``main_loss_multiplier`` x CE(f(x_jit), y) + ``bns_weight`` (``r_feature``) x sum_l c_l (||var_l(x) -
  sigma_l^2||_2 + ||mean_l(x) - mu_l||_2) (batch statistics, biased variance, unsquared norms;
  ``BNS_VARIANTS["deepinversion"]``, c_1 = ``first_bn_multiplier`` = 10, else 1) + ``tv_l2`` x
  TV_l2(x_jit) + ``tv_l1`` x TV_l1(x_jit) + ``l2`` x mean_i ||x_jit,i||_2
  (:func:`~zsq.synth.losses.tv_loss`, :func:`~zsq.synth.losses.l2_image_loss`), the priors on the
  jittered view as in the code; defaults r_feature 0.05, first_bn_multiplier 10, tv_l2 1e-4,
  tv_l1 0, l2 1e-5, lr 0.2, main_loss_multiplier 1 (``imagenet_inversion.py``);
* ``setting_id=1`` of the code (2,000 iterations at full resolution): Adam betas (0.5, 0.9),
  pixels clamped to the valid normalised range after every step, cosine lr with a 100-iteration
  linear warm-up. Setting 0 (2k iterations at half resolution, then 1k at full) is not
  implemented: at 32 px a 16 px phase means little; setting 2 (20k iterations, betas (0.9, 0.999),
  no clip) = ``iters=20000, beta1=0.9, beta2=0.999, clip=false``;
* per iteration: a random roll by up to 30 px (``imagenet_inversion.py``'s hard-coded jitter at
  224 px; ``jitter=-1`` = 30 px at >= 224 px, 2 px -- the CIFAR-10 script's ``lim_0`` -- at <= 32 px,
  30 x size / 224 in between) and a horizontal flip of the whole batch with probability 1/2
  (``--do_flip``);
* targets: random labels (``--random_label``; without it the ImageNet code cycles through 42
  hand-picked ImageNet classes, which does not carry over to other models); start N(0, 1);
* batch 64 (``--bs``); the images kept are those after the last step (the code's ``best_cost`` is
  never updated, so its "best" inputs are the last ones);
* Adaptive DeepInversion (``adi_scale`` > 0, default 0 as in the code): + ``adi_scale`` x (1 -
  clamp(JS(student/T, teacher/T), 0, 1)) with T = 3 and the code's clamps of the probabilities to
  [0.01, 0.99]. It needs a **student**: the runner's API passes only the model being inverted, so a
  student is given to the constructor, ``DeepInversion(config, student=net)``; the hash of its
  current state_dict is written into the config (``student``) so the cache key changes with it.
  Without one, ``adi_scale > 0`` is a BadValueError. The ``mixmix`` subclass takes no student.
* the CIFAR-10 script (``cifar10/deepinversion_cifar10.py`` + its README's "paper parameters") is a
  different setting: :data:`DEEPINVERSION_CIFAR10` holds it as overrides (batch 256, 2,000
  iterations, Adam lr 0.05 default betas, constant lr, no clip, no flip, jitter 2, r_feature 10 with
  no first-layer multiplier, tv_l2 2.5e-5, l2 0; its labels cycle 0-9 = ``label_mode="balanced"``).

``mixmix`` -- MixMix (Li et al., ICCV 2021; no public code, methods.md A.3, **details
unverified**): DeepInversion's loss and loop, plus

* **feature mixing**: the pixels are inverted through several pretrained models at once, their BNS
  and CE terms summed. The extra models are a config field, ``models`` (comma-separated zoo names,
  loaded with :func:`zsq.models.zoo.load_model`, i.e. offline from ``ZSQ_HOME`` when the weights
  are there); a name equal to the inverted model's id is skipped, so the default
  ``cifar10_resnet20,cifar10_resnet32`` means "ResNet-20 and ResNet-32" for either of them. Every
  extra model must take the same input size and class count; a different normalisation is
  converted. The cache key holds the names, not the extra weights' hashes.
* **data mixing**: with probability ``mix_prob`` per iteration, a CutMix-style paste: each image
  receives a box (area fraction 1 - lambda, lambda ~ U(0, 1), i.e. CutMix's Beta(1, 1), centre
  uniform, clipped to the image) from a random partner of the batch, and its target becomes the
  soft label lambda' y_i + (1 - lambda') y_partner with lambda' the box-corrected area ratio; the CE
  terms use the soft targets. The paper's exact mixing (paste with resize, mixing probability) is
  unverified; ``mix_prob = 0.5`` is zsq's choice.
* paper budget: 1,024 images (BRECQ protocol); 2 models here (the paper mixes e.g. ResNet-50,
  MobileNetV2, RegNet for ImageNet).

``kw`` -- The Knowledge Within (Haroush et al., CVPR 2020; no public code, methods.md A.3, **details
unverified**): BNS on batch mean and std, ``||mu_l - mean_l(x)||_2 + ||sigma_l - std_l(x)||_2``
per layer, summed, plus CE to the target labels (the paper's label-conditioned "BN-Statistics +
Inception" variant). Optimiser, iterations, lr and batch are zsq's choices on the IntraQ lineage's
loop (Adam lr 0.1, ReduceLROnPlateau patience 50, 1,000 iterations, batch 256); 1,024 images (the
survey's #images).

``gznq`` -- GZNQ (He et al., CVPRW 2021; no public code, methods.md A.3, **details unverified**):
the paper reads image synthesis as generative modelling that matches the *distribution* of BN
statistics. Implemented as the per-channel Gaussian KL divergence KL(N(mean_l(x), var_l(x)) ||
N(mu_l, sigma_l^2)) (the standardised mean shift (mean - mu)^2 / sigma^2 plus the variance ratio
term), summed over channels and averaged over layers (``BNStatsLoss(reduction="kl")``), plus CE.
The paper's ensemble-of-teachers guidance and its other details are left out; loop settings as
``kw``; 5,120 images (GDFQ-lineage QAT count).

Budgets (:mod:`zsq.synth.pixel`): ``default`` = 5,120 images in 20 batches of 256, 80 iterations
(cosine warm-up 4, i.e. DeepInversion's 5%; KW/GZNQ plateau patience 50 as chosen), mixmix 40
(two models per iteration); ``smoke`` = 32 images, 12 iterations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BadValueError
from ..record import model_info
from .base import SYNTHESIZERS, SynthConfig, state_dict_sha256
from .losses import l2_image_loss, tv_loss
from .pixel import (
    DEFAULT_SET, SMOKE_SET, PixelConfig, PixelState, PixelSynthesizer, Term, check_nonnegative, label_ce, num_classes,
)

#: DeepInversion's CIFAR-10 script (cifar10/deepinversion_cifar10.py, README "paper parameters").
DEEPINVERSION_CIFAR10: dict[str, Any] = {
    "batch_size": 256, "iters": 2000, "lr": 0.05, "beta1": 0.9, "beta2": 0.999, "schedule": "constant",
    "warmup": 0, "clip": False, "flip": False, "jitter": 2, "bns_weight": 10.0, "first_bn_multiplier": 1.0,
    "tv_l2": 2.5e-5, "l2": 0.0, "label_mode": "balanced",
}


@dataclass
class DeepInversionConfig(PixelConfig):
    """Defaults = NVlabs/DeepInversion imagenet_inversion.py, setting_id 1 (see the module doc)."""

    n_images: int = 1024
    batch_size: int = 64  # --bs 64
    iters: int = 2000  # setting_id 1: 2k iterations at full resolution
    lr: float = 0.2  # --lr 0.2
    beta1: float = 0.5  # optim.Adam(betas=[0.5, 0.9]) for setting 0/1
    beta2: float = 0.9
    schedule: str = "cosine"  # lr_cosine_policy(lr, 100, iterations)
    warmup: int = 100
    jitter: int = -1  # 30 px at 224 (hard-coded), 2 px at 32 (CIFAR script)
    flip: bool = True  # --do_flip
    clip: bool = True  # do_clip for setting 0/1
    bns_weight: float = 0.05  # --r_feature 0.05 (README runs: 0.01)
    first_bn_multiplier: float = 10.0
    tv_l1: float = 0.0
    tv_l2: float = 1e-4
    l2: float = 1e-5
    main_loss_multiplier: float = 1.0
    adi_scale: float = 0.0  # Adaptive DeepInversion competition (needs a student)
    adi_temperature: float = 3.0
    student: str = ""  # set from the student passed to the constructor (its weights hash)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {**SMOKE_SET, "iters": 12, "warmup": 1},
        "default": {**DEFAULT_SET, "iters": 80, "warmup": 4},
        "paper": {},
    }

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(self, "first_bn_multiplier", "tv_l1", "tv_l2", "l2", "main_loss_multiplier",
                          "adi_scale")
        if not float(self.adi_temperature) > 0:
            raise BadValueError(f"adi_temperature must be > 0, got {self.adi_temperature}")


def js_competition(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """ADI's ``1 - clamp(JS, 0, 1)`` with the code's probability clamps to [0.01, 0.99]."""
    p = F.softmax(student.float() / temperature, dim=1)
    q = F.softmax(teacher.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * F.kl_div(torch.log(p), m, reduction="batchmean") + 0.5 * F.kl_div(torch.log(q), m, reduction="batchmean")
    return 1.0 - js.clamp(0.0, 1.0)


@SYNTHESIZERS.register("deepinversion")
class DeepInversion(PixelSynthesizer):
    """DeepInversion: BNS (first BN x10) + CE + TV + L2 priors, jitter + flip, clip, cosine lr."""

    name = "deepinversion"
    Config = DeepInversionConfig
    bns_variant = "deepinversion"

    def __init__(self, config: SynthConfig | None = None, student: nn.Module | None = None):
        super().__init__(config)
        self.student = student
        if student is not None:
            self.config = dataclasses.replace(self.config, student=state_dict_sha256(student))

    def default_jitter(self, image_shape: tuple[int, int, int]) -> int:
        h = image_shape[1]
        return 30 if h >= 224 else 2 if h <= 32 else max(2, round(30 * h / 224))

    def bns_options(self, model: nn.Module) -> dict[str, Any]:
        return {"first_layer_weight": self.config.first_bn_multiplier}

    def terms(self, model: nn.Module, labels: Tensor | None, generator: torch.Generator) -> list[Term]:
        cfg = self.config
        out: list[Term] = [lambda s: label_ce(s, cfg.main_loss_multiplier)]
        priors = ((cfg.tv_l2, lambda x: tv_loss(x, "l2")), (cfg.tv_l1, lambda x: tv_loss(x, "l1")),
                  (cfg.l2, l2_image_loss))
        out += [lambda s, w=w, f=f: w * f(s.inputs) for w, f in priors if w]  # on the jittered view
        if cfg.adi_scale:
            out.append(self._competition_term())
        return out

    def _competition_term(self) -> Term:
        cfg = self.config
        if self.student is None:
            raise BadValueError(f"{self.name} adi_scale > 0 needs a student: construct the synthesizer as "
                                "DeepInversion(config, student=model) (or set adi_scale=0)")
        student = self.student

        def term(s: PixelState) -> Tensor:
            with self.autocast(s.inputs.device):
                z = student(s.inputs)
            return cfg.adi_scale * js_competition(s.logits[0], z, cfg.adi_temperature)

        return term

    def auxiliary_models(self) -> list[nn.Module]:
        return [self.student] if self.student is not None and self.config.adi_scale else []


# ---------------------------------------------------------------------------------------------------
# MixMix
# ---------------------------------------------------------------------------------------------------
@dataclass
class MixMixConfig(DeepInversionConfig):
    """DeepInversion's settings + the models mixed and the data-mixing probability (unverified)."""

    models: str = "cifar10_resnet20,cifar10_resnet32"
    mix_prob: float = 0.5

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {**SMOKE_SET, "iters": 12, "warmup": 1},
        "default": {**DEFAULT_SET, "iters": 40, "warmup": 2},
        "paper": {},
    }

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= float(self.mix_prob) <= 1:
            raise BadValueError(f"mix_prob must be in [0, 1], got {self.mix_prob}")
        if not [n for n in str(self.models).split(",") if n.strip()]:
            raise BadValueError("mixmix models must name at least one zoo model (comma-separated)")


class Renormalised(nn.Module):
    """``net`` fed with images normalised for another model: x -> (x * s_from + m_from - m_to) / s_to."""

    def __init__(self, net: nn.Module, src, dst):
        super().__init__()
        self.net = net
        self.register_buffer("scale", torch.tensor(src.std).view(1, -1, 1, 1) / torch.tensor(dst.std).view(1, -1, 1, 1))
        self.register_buffer("shift", (torch.tensor(src.mean) - torch.tensor(dst.mean)).view(1, -1, 1, 1)
                             / torch.tensor(dst.std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * self.scale + self.shift)


def cutmix(x: Tensor, labels: Tensor, n_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-image CutMix with a random partner; returns the mixed view and its soft targets."""
    b, _, h, w = x.shape
    dev = generator.device
    partner = torch.randperm(b, generator=generator, device=dev)
    lam = torch.rand(b, generator=generator, device=dev)
    cut = torch.sqrt(1 - lam)
    cy = torch.rand(b, generator=generator, device=dev) * h
    cx = torch.rand(b, generator=generator, device=dev) * w
    y0, y1 = (cy - cut * h / 2).clamp(0, h).round(), (cy + cut * h / 2).clamp(0, h).round()
    x0, x1 = (cx - cut * w / 2).clamp(0, w).round(), (cx + cut * w / 2).clamp(0, w).round()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    box = ((rows >= y0.view(-1, 1, 1)) & (rows < y1.view(-1, 1, 1))
           & (cols >= x0.view(-1, 1, 1)) & (cols < x1.view(-1, 1, 1))).unsqueeze(1)
    mixed = torch.where(box.to(x.device), x[partner], x)
    kept = 1 - ((y1 - y0) * (x1 - x0) / (h * w))  # box-corrected lambda
    one = F.one_hot(labels, n_classes).float()
    return mixed, kept.view(-1, 1) * one + (1 - kept).view(-1, 1) * one[partner]


@SYNTHESIZERS.register("mixmix")
class MixMix(DeepInversion):
    """MixMix: DeepInversion through several models (BNS + CE summed) with CutMix data mixing."""

    name = "mixmix"
    Config = MixMixConfig

    def __init__(self, config: SynthConfig | None = None):
        super().__init__(config)
        self._loaded: dict[str, nn.Module] = {}

    def extra_models(self, model: nn.Module) -> list[nn.Module]:
        from ..models.zoo import load_model

        info = model_info(model)
        own = getattr(info, "id", None)
        pre = getattr(info, "preprocess", None)
        k = num_classes(model)
        out = []
        for name in (n.strip() for n in self.config.models.split(",")):
            if not name or name == own:
                continue
            if name not in self._loaded:
                self._loaded[name] = load_model(name)
            net = self._loaded[name]
            net_info = model_info(net)
            other = net_info.preprocess
            if pre is not None and other.input_size != pre.input_size:
                raise BadValueError(f"mixmix model {name} takes {other.input_size} px images, {own} takes "
                                    f"{pre.input_size}: mix models of one input size")
            if net_info.num_classes != k:
                raise BadValueError(f"mixmix model {name} has {net_info.num_classes} classes, the inverted model "
                                    f"{k}: mix models of one label space")
            if pre is not None and (tuple(other.mean), tuple(other.std)) != (tuple(pre.mean), tuple(pre.std)):
                net = Renormalised(net, pre, other)
            out.append(net)
        return out

    def mix(self, x: Tensor, labels: Tensor | None, n_classes: int,
            generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        if labels is None or not self.config.mix_prob:
            return x, None
        if float(torch.rand(1, generator=generator, device=generator.device)) >= self.config.mix_prob:
            return x, None
        return cutmix(x, labels, n_classes, generator)


# ---------------------------------------------------------------------------------------------------
# KW and GZNQ
# ---------------------------------------------------------------------------------------------------
@dataclass
class KWConfig(PixelConfig):
    """BNS (batch mean/std, L2 norms) + CE; loop settings are zsq's choices (unverified)."""

    n_images: int = 1024
    batch_size: int = 256
    iters: int = 1000
    lr: float = 0.1
    patience: int = 50
    ce_weight: float = 1.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {**SMOKE_SET, "iters": 12, "patience": 5},
        "default": {**DEFAULT_SET, "iters": 80},
        "paper": {},
    }

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(self, "ce_weight")


@SYNTHESIZERS.register("kw")
class KnowledgeWithin(PixelSynthesizer):
    """The Knowledge Within: batch mean/std BNS (unsquared L2) + CE to the target labels."""

    name = "kw"
    Config = KWConfig
    bns_variant = "deepinversion"  # batch statistics, unsquared L2 ...

    def bns_options(self, model: nn.Module) -> dict[str, Any]:
        return {"dispersion": "std", "first_layer_weight": None}  # ... of mean and std, all layers alike

    def terms(self, model: nn.Module, labels: Tensor | None, generator: torch.Generator) -> list[Term]:
        return [lambda s: label_ce(s, self.config.ce_weight)]


@dataclass
class GZNQConfig(KWConfig):
    """KW's loop with the Gaussian-KL BNS; 5,120 images (unverified)."""

    n_images: int = 5120


@SYNTHESIZERS.register("gznq")
class GZNQ(KnowledgeWithin):
    """GZNQ (as read here): per-channel Gaussian KL between batch and running BN statistics + CE."""

    name = "gznq"
    Config = GZNQConfig
    bns_variant = "gdfq"  # batch mean / biased variance ...

    def bns_options(self, model: nn.Module) -> dict[str, Any]:
        return {"reduction": "kl"}  # ... compared as Gaussians


__all__ = [
    "DEEPINVERSION_CIFAR10", "DeepInversion", "DeepInversionConfig", "GZNQ", "GZNQConfig", "KWConfig",
    "KnowledgeWithin", "MixMix", "MixMixConfig", "cutmix", "js_competition",
]
