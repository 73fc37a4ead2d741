"""The games of the generator-based methods: what each method adds to the shared alternating loop
(:mod:`zsq.gen.loop`), as a generator loss and a student loss, not as another copy of the loop.

A game is a dataclass whose fields are its hyperparameters (recipe hparams of the same names; the
defaults are the official CIFAR ones) with these hooks:

* ``make_generator(num_classes, image_size)``: the generator (:mod:`zsq.gen.generators`);
* ``make_bns(teacher)``: the BN-statistics loss on the teacher the generator step adds (``None``: none);
* ``setup(trainer)``: once, e.g. feature hooks (ZAQ);
* ``sample(g, batch, num_classes)``: latents, labels and soft targets of one batch, drawn from ``g``;
* ``generator_loss(play)`` / ``student_loss(play)``: dicts of loss terms with a ``total``.

Class attributes say how the loop plays: ``student_in_g`` (the generator step also runs the student,
for losses that look at the teacher-student disagreement), ``fresh_batches`` (every student step
draws its own batch from the generator instead of reusing the generator step's images),
``s_first`` (student steps before the generator step in an iteration).

Sign conventions, as the papers state them: GDFQ/Qimera generators *minimise* CE + BNS (images the
teacher classifies as the sampled label, with BN statistics of real data); ZAQ and DFQ-AKD
generators *maximise* the teacher-student discrepancy the student minimises (adversarial);
AdaSG/AdaDFQ generators keep the normalised entropy of the disagreement ``f - Q`` inside
``[lambda_l, lambda_u]`` while the student maximises that entropy. Causal-DFQ's generator
*minimises* the change of the teacher's prediction under an intervention on the style (and
*maximises* the change of the image), its student *minimises* the discrepancy of the intervened
(style-marginalised) predictions; RIS's generator *minimises* the teacher's inconsistency under
input / weight perturbations and the label-space correlation of the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from ..config import Config, Setting, setting, settings_of, to_bool, to_float, to_int
from ..errors import BadValueError, UnknownNameError
from ..qat.engine import kd_loss
from ..synth.losses import BNStatsLoss
from .generators import ARC_GENOTYPES, AutoReConGenerator, ContentStyleGenerator, GDFQGenerator, make_generator


@dataclass
class Sample:
    """One batch's draws: latents ``z``, ``labels`` ((B,) or (B, K) for mixed batches), mixing
    weights ``mix`` ((B, K) or ``None``), the soft target ``target`` ((B, classes) or ``None``) and,
    for games that draw more inside their losses (RIS's perturbations), a ``seed`` drawn with them."""

    z: Tensor
    labels: Tensor | None = None
    mix: Tensor | None = None
    target: Tensor | None = None
    seed: int | None = None


@dataclass
class Play:
    """What a loss hook sees: images ``x``, teacher and student logits (fp32; ``s`` is ``None`` in a
    generator step of a game without ``student_in_g``), the batch's :class:`Sample`, the teacher's
    BNS loss of ``x`` (generator steps), stage features (ZAQ), the loop config, and whether the
    student is still in its warm-up."""

    x: Tensor
    t: Tensor
    s: Tensor | None
    sample: Sample
    cfg: Any
    bns: Tensor | None = None
    t_feats: list[Tensor] = dataclasses.field(default_factory=list)
    s_feats: list[Tensor] = dataclasses.field(default_factory=list)
    warmup: bool = False


def soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    """``mean_b -sum_c target * log_softmax(logits)``: CE on (soft) targets, as the lineage writes it."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row entropy of ``softmax(logits / T)``."""
    z = logits.float() / temperature
    return -(F.softmax(z, 1) * F.log_softmax(z, 1)).sum(1)


def _total(terms: dict[str, Tensor], weights: dict[str, float]) -> dict[str, Tensor]:
    terms["total"] = sum(weights[k] * v for k, v in terms.items())
    return terms


@dataclass
class Game(Config):
    """Base game = GDFQ [code: xushoukai/GDFQ trainer.py]: the conditional generator minimises
    ``ce_g * CE(f(G(z, y)), y) + bns_g * L_BNS`` (BNS variant ``gdfq``); the student minimises
    ``kd_weight * T^2 KL(f || Q) + ce_weight * CE(Q, y)`` (the loop config's KD fields; ``ait=True``
    drops the CE) on the generator step's images, detached."""

    name: ClassVar[str] = "gdfq"
    student_in_g: ClassVar[bool] = False
    fresh_batches: ClassVar[bool] = False
    s_first: ClassVar[bool] = False

    latent_dim: int = setting(100, minimum=1)  # cifar100_resnet20.hocon latent_dim
    ce_g: float = 1.0  # loss_G = loss_one_hot + 0.1 * BNS_loss
    bns_g: float = 0.1
    g_steps: int = setting(1, minimum=1)  # generator steps per iteration
    s_steps: int = setting(1, minimum=1)  # student steps per iteration

    def __post_init__(self):
        for f in dataclasses.fields(self):  # every number >= 0 (zsq.config's converters)
            v, d = getattr(self, f.name), f.default
            if isinstance(d, bool):
                v = to_bool(v, f.name)
            elif isinstance(d, int):
                v = to_int(v, f.name, minimum=0)
            elif isinstance(d, float):
                v = to_float(v, f.name, minimum=0, finite=True)
            setattr(self, f.name, v)
        if self.g_steps < 1 or self.s_steps < 1 or self.latent_dim < 1:
            raise BadValueError("g_steps, s_steps and latent_dim must be >= 1")

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """The fields' settings (:class:`zsq.config.Config`), every number >= 0 unless its field says more
        (the rule ``__post_init__`` applies)."""
        if cls not in Config._settings:
            Config._settings[cls] = {k: dataclasses.replace(s, minimum=0)
                                     if s.kind in ("int", "float") and s.minimum is None else s
                                     for k, s in settings_of(cls).items()}
        return Config._settings[cls]

    @classmethod
    def keys(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return {"game": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None = None):
        """The game from :meth:`to_dict`'s form: its ``"game"`` key must name this game (zsq.json's
        ``generator.game``), the other keys are fields."""
        d = dict(d or {})
        name = d.pop("game", cls.name)
        if name != cls.name:
            raise BadValueError(f"a {cls.name} game cannot be read from the settings of game '{name}'")
        return super().from_dict(d)

    # -- parts -------------------------------------------------------------------------------------
    def make_generator(self, num_classes: int, image_size: int) -> GDFQGenerator:
        return make_generator(num_classes, image_size, latent_dim=self.latent_dim)

    def make_bns(self, teacher: nn.Module) -> BNStatsLoss | None:
        return BNStatsLoss.preset("gdfq", teacher)

    def setup(self, trainer) -> None:
        pass

    def sample(self, g: torch.Generator, batch: int, num_classes: int) -> Sample:
        z = torch.randn(batch, self.latent_dim, generator=g)
        y = torch.randint(0, num_classes, (batch,), generator=g)
        return Sample(z, y, None, F.one_hot(y, num_classes).float())

    # -- losses ------------------------------------------------------------------------------------
    def generator_loss(self, p: Play) -> dict[str, Tensor]:
        return _total({"ce": soft_ce(p.t, p.sample.target), "bns": p.bns}, {"ce": self.ce_g, "bns": self.bns_g})

    def student_loss(self, p: Play) -> dict[str, Tensor]:
        cfg = p.cfg
        ce_w = 0.0 if cfg.ait else cfg.ce_weight
        terms = {"kd": kd_loss(p.s, p.t, cfg.temperature, cfg.kd_reduction)}
        weights = {"kd": cfg.kd_weight}
        if ce_w > 0 and p.sample.target is not None:
            terms["ce"], weights["ce"] = soft_ce(p.s, p.sample.target), ce_w
        return _total(terms, weights)


@dataclass
class QimeraGame(Game):
    """Qimera [code: iamkanghyunchoi/qimera trainer.py, main.py, run_cifar10_4bit.sh]: GDFQ's game
    on boundary-supporting samples. With probability ``mix_prob`` (0.4) a batch is *mixed*: each
    image gets ``mix_k`` (2 on CIFAR-10) labels and softmax(randn) weights, the generator superposes
    the label embeddings with those weights (``--randemb``: a random embedding table) and the
    targets of both CE terms become the weighted soft labels. Generator input: latent 64, mapping
    to 100 (``intermediate_dim``; the disentanglement layer, on by default), noise scale 1."""

    name: ClassVar[str] = "qimera"
    latent_dim: int = setting(64, minimum=1)  # cifar10_resnet20.hocon
    intermediate_dim: int = 100  # options.py (the resnet20 branch never matches "resnet20_cifar10")
    noise_scale: float = 1.0
    mix_prob: float = 0.4
    mix_k: int = 2
    mapping: bool = True  # --no_DM is store_false: the mapping is on unless the flag is given

    def make_generator(self, num_classes: int, image_size: int) -> GDFQGenerator:
        return make_generator(num_classes, image_size, latent_dim=self.latent_dim, superpose=True,
                              intermediate_dim=self.intermediate_dim if self.mapping else None,
                              noise_scale=self.noise_scale)

    def sample(self, g: torch.Generator, batch: int, num_classes: int) -> Sample:
        if float(torch.rand(1, generator=g)) >= self.mix_prob:
            return super().sample(g, batch, num_classes)
        k = self.mix_k
        z = torch.randn(batch, k, self.latent_dim, generator=g)
        y = torch.randint(0, num_classes, (batch, k), generator=g)
        mix = F.softmax(torch.randn(batch, k, generator=g), dim=1)
        target = torch.zeros(batch, num_classes).scatter_add_(1, y, mix)
        return Sample(z, y, mix, target)


@dataclass
class AutoReConGame(Game):
    """AutoReCon / ARC (Zhu et al., IJCAI 2021): GDFQ's game with the NAS-searched generator
    (:class:`~zsq.gen.generators.AutoReConGenerator`; the derived architecture of
    iamkanghyunchoi/ait AutoReCon_AIT, whose trainer keeps GDFQ's CE + 0.1 BNS). ``arc_genotype``:
    ``auto`` = ``cifar100`` for 100 classes at 32 px, ``cifar10`` below 64 px otherwise, ``resnet18``
    from 64 px on (the search itself is not reproduced)."""

    name: ClassVar[str] = "autorecon"
    arc_genotype: str = setting("auto", choices=("auto", *ARC_GENOTYPES))  # the derived architecture

    def __post_init__(self):
        super().__post_init__()
        if self.arc_genotype != "auto" and self.arc_genotype not in ARC_GENOTYPES:
            raise UnknownNameError("AutoReCon genotype", self.arc_genotype, ["auto", *ARC_GENOTYPES])

    def make_generator(self, num_classes: int, image_size: int) -> AutoReConGenerator:
        geno = self.arc_genotype
        if geno == "auto":
            geno = "resnet18" if image_size >= 64 else ("cifar100" if num_classes == 100 else "cifar10")
        return AutoReConGenerator(num_classes, image_size, self.latent_dim, geno)


@dataclass
class AdaptiveGame(Game):
    """AdaSG (AAAI 2023) / AdaDFQ (CVPR 2023) [code: hfutqian/AdaSG, hfutqian/AdaDFQ CIFAR/trainer.py].

    Disagreement ``d = f(x) - Q(x)``; ``H'`` = the entropy of ``softmax(d)`` (T = 1) normalised per
    batch, ``(H - min_b H) / (log C - min_b H)``. Generator (student in the loop, gradients to the
    generator only)::

        mean max(0, lambda_l - H') + mean max(0, H' - lambda_u)
        + beta * (alpha_ds * CE(f - Q, y) + alpha_as * CE(f + Q, y)) + gamma * L_BNS

    Student: ``-T^2 mean H(softmax((f - Q) / T))`` with T = ``temperature`` (20): Q follows f up to
    a constant. Defaults = AdaSG (lambda 0.3 / 0.8, alpha 0.1 / 0.1, beta = gamma = 1; its
    ``torch.zeros(16)`` hinge ties the official code to batch 16, here any batch works)."""

    name: ClassVar[str] = "adasg"
    student_in_g: ClassVar[bool] = True
    lambda_l: float = 0.3
    lambda_u: float = 0.8
    alpha_ds: float = 0.1
    alpha_as: float = 0.1
    beta: float = 1.0
    gamma: float = 1.0

    def generator_loss(self, p: Play) -> dict[str, Tensor]:
        h = entropy(p.t - p.s)
        hn = (h - h.min()) / (math.log(p.t.shape[1]) - h.min())
        target = p.sample.target
        terms = {"margin": torch.relu(self.lambda_l - hn).mean() + torch.relu(hn - self.lambda_u).mean(),
                 "ds": soft_ce(p.t - p.s, target), "as": soft_ce(p.t + p.s, target), "bns": p.bns}
        return _total(terms, {"margin": 1.0, "ds": self.beta * self.alpha_ds, "as": self.beta * self.alpha_as,
                              "bns": self.gamma})

    def student_loss(self, p: Play) -> dict[str, Tensor]:
        t = p.cfg.temperature
        return _total({"entropy": -(t * t) * entropy(p.t - p.s, t).mean()}, {"entropy": 1.0})


@dataclass
class AdaDFQGame(AdaptiveGame):
    """AdaDFQ: AdaSG's game with the margins and balance weights of cifar10_resnet20.hocon
    (alpha_ds 0.2, alpha_as 0.1, lambda_l 0.1, lambda_u 0.8, beta = gamma = 1)."""

    name: ClassVar[str] = "adadfq"
    lambda_l: float = 0.1
    alpha_ds: float = 0.2


def scrm_map(x: Tensor, gamma: float = 0.1) -> tuple[Tensor, Tensor]:
    """ZAQ's spatial- and channel-wise relation maps of a (B, C, H, W) feature [code: FLHonker/ZAQ-code
    utils/loss.py ``SCRM``]: self-attention over positions / over channels (channel energies
    ``max - e``), ``gamma * attended + x``, each (B, C, H*W)."""
    b, c = x.shape[:2]
    v = x.reshape(b, c, -1)
    spatial = torch.bmm(v, F.softmax(torch.bmm(v.transpose(1, 2), v), -1).transpose(1, 2))
    energy = torch.bmm(v, v.transpose(1, 2))
    channel = torch.bmm(F.softmax(energy.amax(-1, keepdim=True) - energy, -1), v)
    return gamma * spatial + v, gamma * channel + v


#: the norm floor of ``scrm_loss``'s channel normalisation (``F.normalize``'s default 1e-12 in the code): a
#: position whose quantized features are all zero (frequent at 3-bit activations; the pre-quantization values
#: are small and positive, so the STE passes gradients) gets the gradient ``1 / eps`` - at 1e-12 one SGD step
#: turned the student's weights to NaN (ZAQ W3A3 / W4A4, lr 1e-4 .. 0.1). A nonzero quantized feature vector
#: has a norm of at least one quantization step (~0.05 at 8 bits, more below), untouched by this floor.
SCRM_EPS = 1e-3


def scrm_loss(s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
    """Sum over stages of ``L1(spatial(s), spatial(t)) + L1(channel(s), channel(t))`` of the
    channel-normalised features (ZAQ's intermediate-level discrepancy; norms floored at ``SCRM_EPS``)."""
    total = t_feats[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(s_feats, t_feats):
        (ss, sc), (ts, tc) = (scrm_map(F.normalize(f.float(), dim=1, eps=SCRM_EPS)) for f in (fs, ft))
        total = total + F.l1_loss(ss, ts) + F.l1_loss(sc, tc)
    return total


def stage_modules(model: nn.Module) -> list[str]:
    """Names of the top-level ``nn.Sequential`` children (ResNet stages ``layer1`` ...): where ZAQ
    reads its intermediate features (the official ResNets return each stage's output)."""
    return [n for n, m in model.named_children() if isinstance(m, nn.Sequential)]


@dataclass
class _UnconditionalGame(Game):
    """The adversarial games' generator: unconditional (``z`` only), plain BN eps (ZAQ's
    ``network/gan.py``; DFQ-AKD's code uses a similar unconditional DCGAN generator)."""

    def make_generator(self, num_classes: int, image_size: int) -> GDFQGenerator:
        return GDFQGenerator(num_classes, image_size, self.latent_dim, cond="none", body_eps=1e-5)

    def sample(self, g: torch.Generator, batch: int, num_classes: int) -> Sample:
        return Sample(torch.randn(batch, self.latent_dim, generator=g))


@dataclass
class ZAQGame(_UnconditionalGame):
    """ZAQ (CVPR 2021) [code: FLHonker/ZAQ-code main.py]: unconditional generator (latent 256, plain
    BN eps); per iteration 5 student steps on fresh generator batches, then one generator step.
    Student: ``L1(Q, f) + alpha * SCRM(Q_stages, f_stages)``; generator: the negation (it
    maximises the two-level discrepancy) ``- beta * mean |f_last stage|`` (activation magnitude)."""

    name: ClassVar[str] = "zaq"
    student_in_g: ClassVar[bool] = True
    fresh_batches: ClassVar[bool] = True
    s_first: ClassVar[bool] = True
    latent_dim: int = setting(256, minimum=1)  # --nz
    s_steps: int = setting(5, minimum=1)  # for k in range(5)
    zaq_alpha: float = 1.0
    zaq_beta: float = 0.1

    def make_bns(self, teacher: nn.Module) -> BNStatsLoss | None:
        return None

    def setup(self, trainer) -> None:
        names = stage_modules(trainer.teacher)
        if not names:
            raise BadValueError("ZAQ reads stage features from top-level nn.Sequential children (ResNet "
                                "stages); this model has none")
        trainer.feature_hooks(names)

    def _discrepancy(self, p: Play) -> dict[str, Tensor]:
        return {"l1": F.l1_loss(p.s, p.t), "scrm": scrm_loss(p.s_feats, p.t_feats)}

    def student_loss(self, p: Play) -> dict[str, Tensor]:
        return _total(self._discrepancy(p), {"l1": 1.0, "scrm": self.zaq_alpha})

    def generator_loss(self, p: Play) -> dict[str, Tensor]:
        terms = self._discrepancy(p)
        terms["act"] = p.t_feats[-1].float().abs().mean()
        return _total(terms, {"l1": -1.0, "scrm": -self.zaq_alpha, "act": -self.zaq_beta})


@dataclass
class AKDGame(_UnconditionalGame):
    """DFQ-AKD (Choi et al., CVPRW 2020), after the unofficial code [code: da2so/Data-Free_Network_
    Quantization_With_Adversarial_Knowledge_Distillation dfqad.py]: unconditional generator (latent
    512); per iteration one generator step, then 10 student steps on fresh batches. Student:
    ``KL(f || Q)`` (T = 1, batchmean). Generator: ``-KL(f || Q) + akd_alpha * (IE + OH + BNS)`` with
    IE = ``sum_c p_mean log p_mean`` (batch-mean teacher prediction: diversity), OH = mean entropy of
    the teacher predictions (confidence), BNS = the per-channel Gaussian KL of BN statistics summed
    over channels and layers (reduction ``kl``), ``akd_alpha`` 0.01. During the student warm-up the
    generator drops the adversarial term (the code's generator warm-up)."""

    name: ClassVar[str] = "dfq-akd"
    student_in_g: ClassVar[bool] = True
    fresh_batches: ClassVar[bool] = True
    latent_dim: int = setting(512, minimum=1)
    s_steps: int = setting(10, minimum=1)
    akd_alpha: float = 0.01
    akd_temperature: float = 1.0

    def make_bns(self, teacher: nn.Module) -> BNStatsLoss | None:
        bns = BNStatsLoss(teacher, stats="batch", dispersion="var", unbiased=False, reduction="kl")
        self._n_bn = len(bns.modules)  # "kl" averages the layers; the code sums them
        return bns

    def generator_loss(self, p: Play) -> dict[str, Tensor]:
        prob = F.softmax(p.t, 1)
        mean = prob.mean(0)
        terms = {"kd": kd_loss(p.s, p.t, self.akd_temperature), "ie": (mean * torch.log(mean)).sum(),
                 "oh": entropy(p.t).mean(), "bns": p.bns * self._n_bn}
        return _total(terms, {"kd": 0.0 if p.warmup else -1.0, "ie": self.akd_alpha, "oh": self.akd_alpha,
                              "bns": self.akd_alpha})

    def student_loss(self, p: Play) -> dict[str, Tensor]:
        return _total({"kd": kd_loss(p.s, p.t, self.akd_temperature)}, {"kd": 1.0})


def js_divergence(a: Tensor, b: Tensor) -> Tensor:
    """Batch mean of the Jensen-Shannon divergence between ``softmax(a)`` and ``softmax(b)`` (rows)."""
    la, lb = F.log_softmax(a.float(), 1), F.log_softmax(b.float(), 1)
    lm = torch.logsumexp(torch.stack([la, lb]), 0) - math.log(2.0)
    return 0.5 * ((la.exp() * (la - lm)).sum(1) + (lb.exp() * (lb - lm)).sum(1)).mean()


def intervention_pairs(n: int) -> tuple[Tensor, Tensor]:
    """Indices ``(a, b)`` of the pairs of a batch of ``n`` drawn by :meth:`CausalGame.sample`: image
    ``b[i] = ceil(n / 2) + i`` has the content (latent and label) of image ``a[i] = i`` and a style of
    its own, for ``i < n // 2`` (an odd batch's middle image is unpaired)."""
    p = n // 2
    return torch.arange(p), torch.arange(n - p, n)


@dataclass
class CausalGame(Game):
    """Causal-DFQ (Shang et al., ICCV 2023) [paper, abstract level: the official repository
    42Shawn/Causal-DFQ holds a readme only; every loss form and weight below is zsq's reading,
    **unverified**]. The causal graph: content (the class) and style (nuisance) cause the image; the
    teacher's and the student's predictions should depend on the content only.

    * Generator: :class:`~zsq.gen.generators.ContentStyleGenerator` (style latent ``style_dim``); a
      batch holds pairs of images with the same content and label and two styles (an intervention
      ``do(style)``, :func:`intervention_pairs`). Loss: GDFQ's ``ce_g CE + bns_g BNS`` on every
      image ``+ inv_g * JS(f(x), f(x'))`` (the teacher's prediction is invariant to the style)
      ``- style_div * mean |x - x'|`` (the style changes the image, so the invariance is not bought
      by ignoring the style).
    * Student (discrepancy reduction): the lineage's KD (+ CE) on every image ``+ causal_s * T^2
      KL(P_f(y | do(c)) || P_Q(y | do(c)))`` with the intervened distributions the style-marginalised
      predictions of each pair, ``P(y | do(c)) = mean_s softmax(logits(x_{c,s}) / T)`` (backdoor
      adjustment over the style), T = the loop's ``temperature``, reduced as its KD
      (``kd_reduction``)."""

    name: ClassVar[str] = "causal-dfq"
    style_dim: int = 32
    inv_g: float = 1.0
    style_div: float = 0.1
    causal_s: float = 1.0

    def make_generator(self, num_classes: int, image_size: int) -> ContentStyleGenerator:
        return ContentStyleGenerator(num_classes, image_size, self.latent_dim, self.style_dim,
                                     cond="embed" if image_size < 64 else "cbn")

    def sample(self, g: torch.Generator, batch: int, num_classes: int) -> Sample:
        a, b = intervention_pairs(batch)
        first = batch - len(b)
        zc = torch.randn(first, self.latent_dim, generator=g)
        y = torch.randint(0, num_classes, (first,), generator=g)
        style = torch.randn(batch, self.style_dim, generator=g)
        labels = torch.cat([y, y[a]])
        z = torch.cat([torch.cat([zc, zc[a]]), style], 1)
        return Sample(z, labels, None, F.one_hot(labels, num_classes).float())

    def generator_loss(self, p: Play) -> dict[str, Tensor]:
        a, b = intervention_pairs(p.x.shape[0])
        terms = {"ce": soft_ce(p.t, p.sample.target), "bns": p.bns, "inv": js_divergence(p.t[a], p.t[b]),
                 "style": (p.x[a].float() - p.x[b].float()).abs().mean() if len(a) else p.t.new_zeros(())}
        return _total(terms, {"ce": self.ce_g, "bns": self.bns_g, "inv": self.inv_g, "style": -self.style_div})

    def student_loss(self, p: Play) -> dict[str, Tensor]:
        terms = super().student_loss(p)
        a, b = intervention_pairs(p.x.shape[0])
        if not len(a):
            terms["causal"] = p.s.new_zeros(())
            return terms
        t = p.cfg.temperature

        def marginal(logits: Tensor) -> Tensor:
            z = logits.float() / t
            return 0.5 * (F.softmax(z[a], 1) + F.softmax(z[b], 1))

        pf, pq = marginal(p.t), marginal(p.s)
        kl = (pf * (torch.log(pf.clamp_min(1e-12)) - torch.log(pq.clamp_min(1e-12)))).sum(1).mean() * t * t
        terms["causal"] = kl / pf.shape[1] if p.cfg.kd_reduction == "mean" else kl
        terms["total"] = terms["total"] + self.causal_s * terms["causal"]
        return terms


def label_correlation(logits: Tensor) -> Tensor:
    """Mean squared Pearson correlation between the logit vectors of different images of a batch."""
    z = F.normalize(logits.float() - logits.float().mean(1, keepdim=True), dim=1)
    n = z.shape[0]
    if n < 2:
        return z.new_zeros(())
    c = z @ z.T
    return (c.pow(2).sum() - c.diagonal().pow(2).sum()) / (n * (n - 1))


@contextlib.contextmanager
def _capture(module: nn.Module | None):
    box: dict[str, Tensor] = {}
    h = module.register_forward_hook(lambda m, i, o: box.__setitem__("out", o)) if module is not None else None
    try:
        yield box
    finally:
        if h is not None:
            h.remove()


@dataclass
class RISGame(Game):
    """RIS, Robustness-Guided Image Synthesis (Bai et al., AAAI 2024) [paper, abstract level; no
    public code: the perturbation sizes, loss forms and weights are zsq's, **unverified**]. GDFQ's
    game with two generator terms:

    * robustness: perturb the input (``x + ris_eps_x N(0, 1)``, normalised image space) and the
      teacher's weights (every parameter ``+ ris_eps_w rms(w) N(0, 1)``, drawn per iteration) and
      penalise the teacher's inconsistency before / after, at the prediction level
      (``ris_pred * KL(f(x) || f~(x~))``) and the feature level (``ris_feat * (1 - cos)`` of the last
      stage's features, the top-level ``nn.Sequential`` children as ZAQ's): images whose semantics
      survive perturbations;
    * diversity: ``ris_div *`` the mean squared correlation between the teacher's (centred) logit
      vectors of different images ("small correlations in the label space"; every pair counts).

    The student is GDFQ's (KD + CE)."""

    name: ClassVar[str] = "ris"
    ris_eps_x: float = 0.1
    ris_eps_w: float = 0.05
    ris_pred: float = 1.0
    ris_feat: float = 1.0
    ris_div: float = 0.1

    def setup(self, trainer) -> None:
        self._teacher = trainer.teacher
        names = stage_modules(trainer.teacher)
        self._stage = dict(trainer.teacher.named_modules())[names[-1]] if names else None
        if names:
            trainer.feature_hooks(names[-1:])

    def sample(self, g: torch.Generator, batch: int, num_classes: int) -> Sample:
        s = super().sample(g, batch, num_classes)
        s.seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        return s

    def perturbed(self, x: Tensor, seed: int | None) -> tuple[Tensor, Tensor | None]:
        """The teacher's logits (fp32) and last-stage features on ``x`` with the input and weights perturbed."""
        teacher = getattr(self, "_teacher", None)
        if teacher is None:
            raise RuntimeError("RISGame.setup(trainer) must run before its losses")
        g = torch.Generator(device=x.device).manual_seed(0 if seed is None else int(seed))
        xt = x + self.ris_eps_x * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        params = {n: w.detach() + self.ris_eps_w * w.detach().float().pow(2).mean().sqrt().to(w.dtype)
                  * torch.randn(w.shape, generator=g, device=w.device, dtype=w.dtype)
                  for n, w in teacher.named_parameters()}
        with _capture(self._stage) as box:
            t = torch.func.functional_call(teacher, params, (xt,))
        return t.float(), box.get("out")

    def generator_loss(self, p: Play) -> dict[str, Tensor]:
        tt, ft = self.perturbed(p.x, p.sample.seed)
        pred = F.kl_div(F.log_softmax(tt, 1), F.log_softmax(p.t, 1), reduction="batchmean", log_target=True)
        feat = p.t.new_zeros(())
        if ft is not None and p.t_feats:
            feat = (1 - F.cosine_similarity(p.t_feats[-1].flatten(1).float(), ft.flatten(1).float(), dim=1)).mean()
        terms = {"ce": soft_ce(p.t, p.sample.target), "bns": p.bns, "pred": pred, "feat": feat,
                 "div": label_correlation(p.t)}
        return _total(terms, {"ce": self.ce_g, "bns": self.bns_g, "pred": self.ris_pred, "feat": self.ris_feat,
                              "div": self.ris_div})


GAMES: dict[str, type[Game]] = {c.name: c for c in (Game, QimeraGame, AutoReConGame, AdaptiveGame, AdaDFQGame,
                                                      ZAQGame, AKDGame, CausalGame, RISGame)}


def get_game(name: str, hp: dict[str, Any] | None = None) -> Game:
    """The game ``name`` with its fields taken from ``hp`` (other keys ignored)."""
    if name not in GAMES:
        raise UnknownNameError("game", name, GAMES)
    return GAMES[name].from_hparams(hp)
