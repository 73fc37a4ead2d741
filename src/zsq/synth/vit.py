"""Vision-transformer inversion: ``psaq-vit``, ``psaq-vit-v2``, ``smi``, ``clamp-vit`` (methods.md A.4).

All four optimise the pixels of a batch against a frozen ViT built from :mod:`zsq.models.vit`
(timm ViT/DeiT: :func:`zsq.models.vit.from_timm`), whose attention matmuls and softmax are modules
that hooks can read and whose ``forward(x, keep=...)`` feeds only chosen patch tokens. They share
one loop, :class:`ViTInversion` (the CNN loop of :mod:`zsq.synth.pixel` is built around
BN-statistics hooks and a dense forward; its lr schedule, label and clipping helpers are reused):
labels, a Gaussian start, Adam on the pixels, per-iteration roll jitter + flip, a loss = the
method's objective + ``ce_weight`` x CE to the labels + a TV_l2 prior, clamping to the valid
normalised range after every step. Every random draw comes from the batch's generator, so batches
are independent (shardable); the forward runs under bf16 autocast (``precision="bf16"``, measured
1.9x faster than fp32 per iteration on ``cifar10_vit_tiny`` at batch 32; features, losses and
pixels stay fp32).

``psaq-vit`` -- PSAQ-ViT (Li et al., ECCV 2022). Source: zkkli/PSAQ-ViT ``generate_data.py``,
``utils/kde.py``, ``utils/build_model.py``, ``test_quant.py``:

* objective = - sum over blocks of the differential entropy of the **patch similarity**: the
  output of ``attn.matmul2`` (``attn @ v``, [B, heads, N+1, d]) averaged over heads, CLS token
  dropped; cosine similarity of every pair of patch tokens ([B, N, N]); a Gaussian KDE (bandwidth
  0.01, the ``GaussianKernel`` default) of each image's N^2 similarities evaluated at 10 points
  evenly spaced between the batch's min and max similarity (constants, ``.item()`` in the code);
  entropy = trapezoidal integral of ``-p log p`` with ``p = density + 1e-4``, averaged over the
  batch (:func:`patch_similarity_entropy`);
* + 1.0 x CE(f(x_jit), y) with uniform random labels + 0.05 x | TV_l2(x_jit) - v |, v ~ U(2500,
  3000) drawn once per batch ("for batch_size 32" at 224 px). v is scaled here by sqrt(#values /
  (32 x 3 x 224 x 224)) (TV_l2 is a sum of Frobenius norms, so it grows with the square root of
  the number of pixel values): 357-429 for 32 images of 32 x 32. For reference, real images measured
  here: ImageNet val batches of 32 at 224 px have TV_l2 2,696-3,566 (the official range sits at ~0.85
  of real data); CIFAR-10 test batches of 32 have 548-620, so at 32 px the scaled range asks for
  smoother images than real ones (~0.65x);
* Adam lr 0.20 (DeiT; 0.25 for Swin), betas (0.5, 0.9), eps 1e-8; **two rounds** of 500
  iterations on the same optimiser, each with DeepInversion's cosine lr (100-iteration linear
  warm-up); per iteration a roll of **both axes by one offset** ``off ~ U{-lim, lim}`` with lim 15
  px (round 1) and 30 px (round 2) at 224 px (``jitter=-1``: 15 x size / 224, rounded, times the
  round number: 2 / 4 px at 32 px), then a flip with probability 1/2; clamp after every step;
* one batch of 32 (``--calib-batchsize 32``), calibrated with one forward pass (running min/max),
  which is the ``psaq-vit`` recipe (:mod:`zsq.catalogue.vit`).

``psaq-vit-v2`` -- PSAQ-ViT V2 (Li et al., TNNLS 2023). **No public code** (the repository holds V1
only, tag ``V1`` = ``main``); the paper's "adaptive teacher-student strategy" at summary level,
**details unverified**: the samples are *hard* for a quantized student -- the loss adds
``- adv_weight x KL(softmax(T(x_jit)) || softmax(S(x_jit)))`` (maximise the teacher-student
disagreement) to PSAQ's patch-similarity objective, and "without auxiliary category guidance" the
CE term is off (``ce_weight=0``). The synthesizer API hands ``make_batch`` the FP model only, so
the synthesizer builds **its own student**: a ``vit-ptq`` fake-quantized copy at
``student_w_bits`` / ``student_a_bits`` (W4/A8, the paper's main setting), min-max calibrated on
the batch's current pixels and re-calibrated every ``student_every`` iterations -- the student
"evolves" with the samples as the recipe's final min-max quantizer would. The paper's student also
fine-tunes its weights by distillation on the samples; that is left out (zsq's PTQ flow calibrates
only). The student runs in fp32; loop settings are PSAQ-ViT's.

``smi`` -- Sparse Model Inversion (Hu et al., ICML 2024). Source: Egg-Hu/SMI ``synthesis/smi.py``,
``utils/build_model.py``, ``utils/data_utils.py``, ``test_quant.py``:

* DeepInversion without BN: loss = 1 x CE(f(x_jit), y) + 1e-4 x TV_l2(x) (``tv2``, on the
  un-jittered pixels as in the code; adv, bn, l2, tv1 = 0); random labels (sorted); Adam lr 0.25,
  betas (0.5, 0.99), constant lr; 4,000 iterations, batch 32; clamp after every step;
* jitter: independent row / column offsets up to size / 8 (28 px at 224, 4 px at 32) and a flip
  with probability 1/2 (``jitter_and_flip``);
* **sparse inversion**: at iterations ``prune_its`` (50, 100, 200, 300) the fraction
  ``prune_ratio`` (0.3) of the *remaining* patches with the lowest CLS attention (last block's
  softmax, head average, CLS row) is dropped: ``int(K x (1 - r))`` are kept. The attention is read
  from the previous iteration, which -- like the pruning iteration itself -- runs without jitter.
  Dropped patches are no longer fed forward (``model(x, keep=...)``: the patch embedding still sees
  the whole image, the blocks only the kept tokens, as in the code) and get no gradient but TV's.
  While sparse, a jittered iteration moves the kept indices with the content (the offset rounded to
  whole patches, then the flip; ``jitter_and_flip_index``);
* the result: a dense forward of the final pixels picks the ``int((N + 1) x prod(1 - r))`` patches
  with the highest CLS attention (the code counts the CLS token in ``num_patches``) and every
  other patch is set to 0 (``final_select="kept"``: keep the optimised set instead). The shard
  holds ``images``, ``labels`` and ``keep`` (sorted patch indices, [B, K]); calibration finds the
  kept patches again as the non-zero ones (``find_non_zero_patches``) and runs the kept-token
  forward: the ``calib-sparse`` quantizer of the ``smi`` recipe. ``prune_its=""`` is dense inversion
  (the code's ``--prune_it -1``, DeepInversion for ViTs).

``clamp-vit`` -- CLAMP-ViT (Ramachandran et al., ECCV 2024). The official repository is
evaluation-only (pre-quantized checkpoints, an FQ-ViT-derived quantizer, no data generation), so
the synthesis follows the paper's summary, **details unverified**: a **patch-level contrastive
loss** replaces PSAQ's global entropy. For every block's patch features (the same ``matmul2`` head
average as PSAQ-ViT), each patch is an anchor; its neighbours within a (2 ``radius`` + 1)^2
window on the patch grid are the candidates; those at least as similar as the neighbourhood's mean
similarity (cosine, chosen without gradient) are positives, the others negatives; multi-positive
InfoNCE ``-log(sum_pos exp(s / tau) / sum_neighbours exp(s / tau))`` with tau = 0.1, averaged over
anchors and images, summed over blocks (:func:`patch_contrastive_loss`). Radius, threshold rule,
temperature and weight are zsq's choices. PSAQ-ViT's priors (CE, |TV - v|), optimiser and rounds
are kept. CLAMP-ViT's second stage (layer-wise evolutionary search of the quantization parameters
with a contrastive fitness, mixed precision) is not implemented: its recipe calibrates min-max.

Budgets (``cifar10_vit_tiny``, batch 32, one thread of the 2-core machine while other jobs ran, so
+-30 %): one iteration takes 0.22-0.35 s for PSAQ-ViT (KDE included), 0.27 s for CLAMP-ViT, 0.84 s
for PSAQ-ViT V2 (its fp32 fake-quantized student costs 0.57 s forward + backward; in bf16 it is only
1.2x faster and 4 % off), 0.18-0.27 s for dense SMI and 0.07 s at SMI's final 14 patches. The bf16
forward does not disturb the entropy: on the random ViT, -13.830 vs -13.826 (fp32) summed over the
6 blocks, input-gradient cosine 0.99999. ``paper`` = the official settings above (32 images; PSAQ-ViT
~4-6 min, SMI ~5 min). ``default`` keeps the official 32-image batch and shortens the optimisation:
PSAQ-ViT / CLAMP-ViT 2 rounds x 150 iterations (warm-up 30: the official 20 %), ~65-120 s, i.e. 2-4 s
per image; PSAQ-ViT V2 2 x 100, student re-calibrated every 20, ~3 min (~5 s per image); SMI 500
iterations with the official pruning schedule, ~57 s (~1.8 s per image). ``smoke`` = 8 images, a
handful of iterations. SMI's speed-up (``bench/smi_speed.py``, interleaved step times): 1.7x / 2.1x /
2.9x / 3.7x faster steps at 44 / 30 / 21 / 14 patches, 2.3x for a 500-iteration run and 3.4x for the
paper's 4,000 (end to end, 320 iterations: 66 s vs 125 s, 1.9x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BadValueError
from .base import SYNTHESIZERS, StepCallback, SynthConfig, Synthesizer
from .losses import tv_loss
from .pixel import check_nonnegative, cosine_lr, num_classes, pixel_range
from .vit_parts import (  # the losses and patch operations (re-exported: tests, zsq.ptq.sparse)
    cls_attention, cosine_matrix, differential_entropy, _float_list, gaussian_kde, head_mean_patches, _int_list, jitter_flip, moved_patches, neighbour_mask, nonzero_patches, patch_contrastive_loss, patch_mask, patch_similarity_entropy, Tap, vit_blocks,
)

SCHEDULES = ("cosine", "constant")
FINAL_SELECT = ("dense", "kept")
#: TV_l2 targets are given for PSAQ-ViT's batch: 32 images of 3 x 224 x 224
TV_REFERENCE_VALUES = 32 * 3 * 224 * 224


# ---------------------------------------------------------------------------------------------------
# the shared loop
# ---------------------------------------------------------------------------------------------------
@dataclass
class ViTInversionConfig(SynthConfig):
    """Settings of the shared ViT loop; defaults = PSAQ-ViT's generate_data.py (DeiT)."""

    n_images: int = 32  # test_quant.py --calib-batchsize 32: one batch
    batch_size: int = 32
    channels_last: bool = False  # only the patch embedding is a convolution
    rounds: int = 2  # "Train for two epochs" on one optimiser; each round restarts the lr schedule
    iters: int = 500  # iterations per round
    lr: float = 0.2  # 0.20 DeiT, 0.25 Swin
    beta1: float = 0.5  # Adam betas [0.5, 0.9], eps 1e-8
    beta2: float = 0.9
    schedule: str = "cosine"  # lr_cosine_policy(lr, 100, iterations), per round
    warmup: int = 100
    jitter: int = -1  # roll limit (px) of round 1, x round number after; -1: the method's size-scaled default
    flip: bool = True
    clip: bool = True  # clamp to the valid normalised range after every step
    ce_weight: float = 1.0  # 1.0 * CE(output, random labels)
    tv_l2: float = 0.05  # weight of the TV_l2 term ...
    tv_target_lo: float = 2500.0  # ... |TV_l2 - v|, v ~ U(lo, hi) at 32 x 3 x 224 x 224 values (0, 0: plain TV)
    tv_target_hi: float = 3000.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"n_images": 8, "batch_size": 8, "iters": 3, "warmup": 1},
        "default": {"iters": 150, "warmup": 30},
        "paper": {},
    }

    def __post_init__(self):
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise BadValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        if int(self.rounds) < 1 or int(self.iters) < 1:
            raise BadValueError(f"rounds and iters must be >= 1, got {self.rounds}, {self.iters}")
        if not float(self.lr) > 0 or not (0 <= float(self.beta1) < 1 and 0 <= float(self.beta2) < 1):
            raise BadValueError(f"need lr > 0 and betas in [0, 1), got {self.lr}, {self.beta1}, {self.beta2}")
        if int(self.warmup) < 0 or int(self.jitter) < -1:
            raise BadValueError(f"warmup must be >= 0 and jitter >= -1, got {self.warmup}, {self.jitter}")
        check_nonnegative(self, "ce_weight", "tv_l2", "tv_target_lo", "tv_target_hi")
        if float(self.tv_target_hi) < float(self.tv_target_lo):
            raise BadValueError("tv_target_hi must be >= tv_target_lo")


@dataclass
class ViTStep:
    """What the loss sees at one iteration."""

    it: int
    x: Tensor  # the optimised pixels
    view: Tensor  # the jittered / flipped view the model saw
    logits: Tensor  # fp32
    labels: Tensor | None
    feats: list[Tensor]  # per-block patch features (fp32) when the method reads them
    keep: Tensor | None  # kept patch indices fed forward (None: all)


class ViTInversion(Synthesizer):
    """The pixel loop shared by the ViT synthesizers; subclasses add :meth:`objective` and hooks."""

    Config = ViTInversionConfig
    #: read every block's ``attn.matmul2`` output (head average, patch tokens) into ``ViTStep.feats``
    reads_features: ClassVar[bool] = False
    same_offset: ClassVar[bool] = False  # roll both axes by one offset (PSAQ-ViT)
    tv_on_view: ClassVar[bool] = True  # TV of the jittered view (PSAQ-ViT) or of the pixels (SMI)

    # hooks ----------------------------------------------------------------------------------------
    def objective(self, s: ViTStep, run: SimpleNamespace) -> Tensor:
        """The method's own loss term (before the CE / TV priors)."""
        return s.logits.new_zeros(())

    def begin(self, model: nn.Module, x: Tensor, run: SimpleNamespace) -> None:
        """Per-batch set-up before the first iteration (state goes into ``run``)."""

    def after_step(self, model: nn.Module, s: ViTStep, run: SimpleNamespace) -> None:
        """Called after each Adam step and clamp."""

    def finish(self, model: nn.Module, x: Tensor, run: SimpleNamespace) -> dict[str, Tensor]:
        out = {"images": x}
        if run.labels is not None:
            out["labels"] = run.labels.to(torch.int64)
        return out

    def view(self, x: Tensor, it: int, lim: int, generator: torch.Generator,
             run: SimpleNamespace) -> tuple[Tensor, Tensor | None]:
        """The input of iteration ``it`` and the kept patches to feed (None: all)."""
        v, _ = jitter_flip(x, lim, self.same_offset, self.config.flip, generator)
        return v, None

    def jitter_limit(self, size: int, round_index: int) -> int:
        """Roll limit (px) in round ``round_index`` (0-based)."""
        return max(int(self.config.jitter), 0) * (round_index + 1)

    # the batch ------------------------------------------------------------------------------------
    def make_batch(self, model: nn.Module, batch_index: int, generator: torch.Generator, *, batch_size: int,
                   image_shape: tuple[int, int, int], step: StepCallback | None = None) -> dict[str, Tensor]:
        cfg = self.config
        blocks = vit_blocks(model, self.name)
        dev = generator.device
        labels = (torch.randint(0, num_classes(model), (batch_size,), generator=generator, device=dev)
                  if cfg.ce_weight > 0 else None)
        x = torch.randn((batch_size, *image_shape), generator=generator, device=dev)
        run = SimpleNamespace(labels=labels, tv_target=None, blocks=blocks, patch=int(model.patch_embed.patch_size),
                              grid=image_shape[1] // int(model.patch_embed.patch_size))
        if cfg.tv_l2 > 0 and cfg.tv_target_hi > 0:
            u = float(torch.rand(1, generator=generator, device=dev))
            v = cfg.tv_target_lo + u * (cfg.tv_target_hi - cfg.tv_target_lo)
            run.tv_target = v * math.sqrt(x.numel() / TV_REFERENCE_VALUES)
        self.begin(model, x, run)
        x = self.optimize(model, x, run, generator, step)
        return self.finish(model, x, run)

    def priors(self, s: ViTStep, run: SimpleNamespace) -> Tensor:
        """``ce_weight`` x CE(logits, labels) + ``tv_l2`` x TV_l2 (or x |TV_l2 - v|)."""
        cfg = self.config
        loss = s.logits.new_zeros(())
        if s.labels is not None:
            loss = loss + cfg.ce_weight * F.cross_entropy(s.logits, s.labels)
        if cfg.tv_l2 > 0:
            tv = tv_loss(s.view if self.tv_on_view else s.x, "l2")
            loss = loss + cfg.tv_l2 * (tv if run.tv_target is None else (tv - run.tv_target).abs())
        return loss

    def optimize(self, model: nn.Module, x: Tensor, run: SimpleNamespace, generator: torch.Generator,
                 step: StepCallback | None = None) -> Tensor:
        cfg = self.config
        bounds = tuple(b.to(x) for b in pixel_range(model, x.shape[1])) if cfg.clip else None
        x = x.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
        total = cfg.rounds * cfg.iters
        feats = Tap([b.attn.matmul2 for b in run.blocks] if self.reads_features else [], head_mean_patches)
        with feats:
            for r in range(cfg.rounds):
                lim = self.jitter_limit(x.shape[-1], r)
                amp = self.amp(x.device)
                for i in range(cfg.iters):
                    it = r * cfg.iters + i
                    if cfg.schedule == "cosine":
                        for group in opt.param_groups:
                            group["lr"] = cosine_lr(cfg.lr, i, cfg.iters, cfg.warmup)
                    view, keep = self.view(x, it, lim, generator, run)
                    with amp.autocast():
                        logits = model(view) if keep is None else model(view, keep=keep)
                    s = ViTStep(it=it, x=x, view=view, logits=logits.float(), labels=run.labels,
                                feats=[f for f in feats.out if f is not None], keep=keep)
                    loss = self.objective(s, run) + self.priors(s, run)
                    opt.zero_grad(set_to_none=True)
                    amp.backward(loss)
                    amp.step(opt)
                    if bounds is not None:
                        with torch.no_grad():
                            x.clamp_(*bounds)
                    self.after_step(model, s, run)
                    if step is not None:
                        step(it, total, loss.item())
        return x.detach().contiguous()


# ---------------------------------------------------------------------------------------------------
# PSAQ-ViT, PSAQ-ViT V2, CLAMP-ViT
# ---------------------------------------------------------------------------------------------------
@dataclass
class PSAQViTConfig(ViTInversionConfig):
    """Defaults = zkkli/PSAQ-ViT generate_data.py (DeiT); see the module doc."""

    entropy_weight: float = 1.0  # loss_entropy -= dif_entropy_estimated, summed over blocks
    kde_bandwidth: float = 0.01  # GaussianKernel(bandwidth=0.01)
    kde_points: int = 10  # torch.linspace(min, max, steps=10)

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(self, "entropy_weight")
        if not float(self.kde_bandwidth) > 0 or int(self.kde_points) < 2:
            raise BadValueError(f"need kde_bandwidth > 0 and kde_points >= 2, got {self.kde_bandwidth}, "
                                f"{self.kde_points}")


@SYNTHESIZERS.register("psaq-vit")
class PSAQViT(ViTInversion):
    """Maximise the patch-similarity entropy of every block (+ CE + |TV - v|), PSAQ-ViT."""

    name = "psaq-vit"
    Config = PSAQViTConfig
    reads_features = True
    same_offset = True

    def jitter_limit(self, size: int, round_index: int) -> int:
        base = round(15 * size / 224) if self.config.jitter == -1 else int(self.config.jitter)
        return base * (round_index + 1)  # 15 px, then 30 px at 224

    def objective(self, s: ViTStep, run: SimpleNamespace) -> Tensor:
        cfg = self.config
        if not cfg.entropy_weight:
            return s.logits.new_zeros(())
        h = sum(patch_similarity_entropy(f, cfg.kde_bandwidth, cfg.kde_points) for f in s.feats)
        return -cfg.entropy_weight * h


@dataclass
class PSAQViTV2Config(PSAQViTConfig):
    """PSAQ-ViT's loop plus the adaptive student (no public code: zsq's settings, see the module doc)."""

    ce_weight: float = 0.0  # "without the auxiliary category guidance"
    adv_weight: float = 1.0  # - adv_weight * KL(teacher || student) on the view
    student_w_bits: int = 4  # the paper's main W4/A8 setting
    student_a_bits: int = 8
    student_every: int = 50  # re-calibrate the student's ranges on the current pixels

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"n_images": 8, "batch_size": 8, "iters": 3, "warmup": 1, "student_every": 2},
        "default": {"iters": 100, "warmup": 20, "student_every": 20},
        "paper": {},
    }

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(self, "adv_weight")
        from ..spec import check_bits

        check_bits(int(self.student_w_bits), "student_w_bits")
        check_bits(int(self.student_a_bits), "student_a_bits")
        if int(self.student_every) < 1:
            raise BadValueError(f"student_every must be >= 1, got {self.student_every}")


@SYNTHESIZERS.register("psaq-vit-v2")
class PSAQViTV2(PSAQViT):
    """PSAQ-ViT samples made hard for a min-max quantized student the synthesizer builds itself."""

    name = "psaq-vit-v2"
    Config = PSAQViTV2Config

    def begin(self, model: nn.Module, x: Tensor, run: SimpleNamespace) -> None:
        from ..quant.protocol import apply_protocol
        from ..spec import PROTOCOLS

        cfg = self.config
        run.student = apply_protocol(model, PROTOCOLS["vit-ptq"], cfg.student_w_bits, cfg.student_a_bits)
        for p in run.student.parameters():
            p.requires_grad_(False)
        self._calibrate_student(run, x)

    @staticmethod
    def _calibrate_student(run: SimpleNamespace, x: Tensor) -> None:
        """Min-max activation ranges from one forward of ``x`` (as ``ptq.calibrate``, but under
        ``no_grad``: the student's scales must stay usable by autograd)."""
        from ..ptq.calibrate import act_quantizers

        aqs = [q for _, q in act_quantizers(run.student)]
        for q in aqs:
            q.start_observing("minmax")
        with torch.no_grad():
            run.student(x.detach())
        for q in aqs:
            q.finish_observing()

    def objective(self, s: ViTStep, run: SimpleNamespace) -> Tensor:
        loss = super().objective(s, run)
        if self.config.adv_weight:
            t = F.log_softmax(s.logits, dim=1)
            st = F.log_softmax(run.student(s.view).float(), dim=1)
            kl = F.kl_div(st, t, log_target=True, reduction="batchmean")  # KL(teacher || student)
            loss = loss - self.config.adv_weight * kl
        return loss

    def after_step(self, model: nn.Module, s: ViTStep, run: SimpleNamespace) -> None:
        if (s.it + 1) % self.config.student_every == 0:
            self._calibrate_student(run, s.x)


@dataclass
class CLAMPViTConfig(PSAQViTConfig):
    """PSAQ-ViT's loop and priors with the patch contrastive objective (unverified: see the module doc)."""

    entropy_weight: float = 0.0  # the contrastive term replaces PSAQ-ViT's entropy
    contrastive_weight: float = 1.0
    temperature: float = 0.1
    radius: int = 1  # neighbourhood: (2 radius + 1)^2 patches

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(self, "contrastive_weight")
        if not float(self.temperature) > 0 or int(self.radius) < 1:
            raise BadValueError(f"need temperature > 0 and radius >= 1, got {self.temperature}, {self.radius}")


@SYNTHESIZERS.register("clamp-vit")
class CLAMPViT(PSAQViT):
    """Patch-level contrastive synthesis (CLAMP-ViT's first stage, zsq's reading of the paper)."""

    name = "clamp-vit"
    Config = CLAMPViTConfig

    def objective(self, s: ViTStep, run: SimpleNamespace) -> Tensor:
        cfg = self.config
        loss = super().objective(s, run)
        if cfg.contrastive_weight:
            loss = loss + cfg.contrastive_weight * sum(
                patch_contrastive_loss(f, run.grid, cfg.radius, cfg.temperature) for f in s.feats)
        return loss


# ---------------------------------------------------------------------------------------------------
# SMI
# ---------------------------------------------------------------------------------------------------
@dataclass
class SMIConfig(ViTInversionConfig):
    """Defaults = Egg-Hu/SMI test_quant.py + synthesis/smi.py (see the module doc)."""

    rounds: int = 1
    iters: int = 4000  # iterations=4000
    lr: float = 0.25  # lr_g=0.25
    beta1: float = 0.5  # Adam betas [0.5, 0.99]
    beta2: float = 0.99
    schedule: str = "constant"
    warmup: int = 0
    jitter: int = -1  # size // 8 (jitter_and_flip lim=1/8)
    tv_l2: float = 1e-4  # tv2=0.0001 on TV_l2(inputs)
    tv_target_lo: float = 0.0
    tv_target_hi: float = 0.0
    prune_its: str = "50,100,200,300"  # README: --prune_it 50 100 200 300 ("" = dense inversion)
    prune_ratio: str = "0.3"  # --prune_ratio 0.3 0.3 0.3 0.3 (one value for all, or one per iteration)
    final_select: str = "dense"  # re-pick the final patches by a dense forward (code) or keep the optimised set

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"n_images": 8, "batch_size": 8, "iters": 8, "prune_its": "2,4,6"},
        "default": {"iters": 500},
        "paper": {},
    }

    def __post_init__(self):
        super().__post_init__()
        its, ratios = self.prune_schedule()
        if any(b - a < 2 for a, b in zip(its, its[1:])) or (its and its[0] < 1):
            raise BadValueError(f"prune_its must be increasing, >= 1 and at least 2 apart, got '{self.prune_its}'")
        if any(not 0 <= r < 1 for r in ratios):
            raise BadValueError(f"prune_ratio values must be in [0, 1), got '{self.prune_ratio}'")
        if self.final_select not in FINAL_SELECT:
            raise BadValueError(f"final_select must be one of {', '.join(FINAL_SELECT)}, got '{self.final_select}'")

    def prune_schedule(self) -> tuple[list[int], list[float]]:
        """``(iterations, ratios)`` of the sparse inversion (empty: dense)."""
        its = _int_list(self.prune_its, "prune_its")
        ratios = _float_list(self.prune_ratio, "prune_ratio")
        if len(ratios) == 1:
            ratios = ratios * len(its)
        if len(ratios) != len(its):
            raise BadValueError(f"prune_ratio needs one value or one per prune iteration ({len(its)}), "
                                f"got '{self.prune_ratio}'")
        return its, ratios


@SYNTHESIZERS.register("smi")
class SMI(ViTInversion):
    """Sparse model inversion: CE + TV_l2, dropping low-attention patches as the inversion goes (SMI)."""

    name = "smi"
    Config = SMIConfig
    tv_on_view = False

    def jitter_limit(self, size: int, round_index: int) -> int:
        return size // 8 if self.config.jitter == -1 else int(self.config.jitter)

    def begin(self, model: nn.Module, x: Tensor, run: SimpleNamespace) -> None:
        if run.labels is not None:
            run.labels = run.labels.sort().values  # targets.sort() "for better visualization"
        its, ratios = self.config.prune_schedule()
        run.prune = dict(zip(its, ratios))
        run.keep = None  # all patches
        run.tap = Tap([run.blocks[-1].attn.softmax], cls_attention)

    def optimize(self, model, x, run, generator, step=None):
        with run.tap:
            return super().optimize(model, x, run, generator, step)

    def view(self, x, it, lim, generator, run):
        if it + 1 in run.prune:  # the iteration before a pruning step: no jitter, its attention is used next
            return x, run.keep
        if it in run.prune:
            att = run.tap.out[0]  # [B, K]: CLS attention of the previous (un-jittered) forward
            k = int(att.shape[1] * (1.0 - run.prune[it]))
            top = att.topk(max(k, 1), dim=1).indices
            run.keep = top if run.keep is None else torch.gather(run.keep, 1, top)
            return x, run.keep
        v, (o1, o2, flipped) = jitter_flip(x, lim, False, self.config.flip, generator)
        if run.keep is None:
            return v, None
        return v, moved_patches(run.keep, o1, o2, flipped, run.grid, run.patch)

    def finish(self, model: nn.Module, x: Tensor, run: SimpleNamespace) -> dict[str, Tensor]:
        n = run.grid * run.grid
        if self.config.final_select == "kept" and run.keep is not None:
            keep = run.keep
        else:
            with torch.no_grad(), run.tap, self.autocast(x.device):
                model(x)
            frac = math.prod(1.0 - r for r in run.prune.values())
            k = min(n, int((n + 1) * frac))  # the code's num_patches (197) counts the CLS token
            keep = run.tap.out[0].topk(max(k, 1), dim=1).indices
        keep = keep.sort(dim=1).values
        out = super().finish(model, x * patch_mask(keep, run.grid, run.patch), run)
        out["keep"] = keep.to(torch.int64)
        return out


__all__ = [
    "CLAMPViT", "CLAMPViTConfig", "PSAQViT", "PSAQViTConfig", "PSAQViTV2", "PSAQViTV2Config", "SMI", "SMIConfig",
    "Tap", "ViTInversion", "ViTInversionConfig", "ViTStep", "cls_attention", "cosine_matrix", "differential_entropy",
    "gaussian_kde", "head_mean_patches", "jitter_flip", "moved_patches", "neighbour_mask", "nonzero_patches",
    "patch_contrastive_loss", "patch_mask", "patch_similarity_entropy", "vit_blocks",
]
