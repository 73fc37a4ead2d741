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

**Method-specific terms** (issue 8; each off by default, and then not computed at all): CE on
selected samples (SynQ, PLF), HAST's feature alignment and sample difficulty promotion, SynQ's
low-pass filter and Grad-CAM alignment, TexQ's mixup KD; :mod:`zsq.qat.losses` describes each with its
source, :mod:`zsq.qat.student` computes them for a batch. The trainer takes optional ``labels``
aligned with ``images`` (the synthesis labels of a set that has them); every batch indexes both with
the same draw.

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
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import distributed as zdist
from ..errors import BadValueError
from ..quant.modules import QUANT_LAYERS, Quantizer
from ..quant.observers import Observer
from ..quant.protocol import frozen_fp_copy
from ..record import record_of
from ..train import (Fingerprint, NestedBar, cosine_lr, deferred_sigint, derive_seed, read_checkpoint,
                     seeded_generator, state_copy, stop_if_interrupted, write_checkpoint)
# the config, the loss terms and the student side live in their own modules; their names stay importable
# from here (zsq.gen, tests)
from .config import (  # noqa: F401
    CE_SELECTS, CE_TARGETS, EMA_FRACTION, KD_REDUCTIONS, PRECISIONS, _METHOD_FIELDS, QATConfig,
)
from .losses import (  # noqa: F401
    _Recorder, cam_layer, channel_attention, feature_layers, grad_cam, kd_loss, lowpass_filter, masked_ce,
    normalized_entropy, random_resized_crop_flip,
)
from .student import StudentLosses, _fused_act_quant, _Pass  # noqa: F401

CKPT_NAME = "qat.pt"
CKPT_FORMAT = "zsq-qat-1"
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


# --------------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------------
def step_seed(seed: int, epoch: int, step: int) -> int:
    """A 63-bit seed for step ``step`` of epoch ``epoch`` of run ``seed`` (independent of other steps)."""
    return derive_seed("zsq-qat", seed, epoch, step)


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


# --------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------
class QATTrainer(StudentLosses):
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
        self._place_images()
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

    def _place_images(self) -> None:
        """On CUDA the image set moves to the device when it fits (a quarter of the free memory; batches are
        then drawn and augmented there), else it goes to pinned memory (batches copied without blocking);
        on the CPU it stays where it is."""
        if self.device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(self.device)
        nbytes = self.images.numel() * self.images.element_size()
        self.images = self.images.to(self.device) if nbytes <= free // 4 else self.images.pin_memory()

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
            x = self.images[idx[rows].to(self.images.device)]
            if x.device != self.device:  # a set in pinned host memory: gather, pin, copy without blocking
                x = x.pin_memory().to(self.device, non_blocking=True)
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
        self.amp.backward(loss * self._weight if self.world > 1 else loss, inputs=self.params)  # not the teacher
        if self.world > 1:
            zdist.all_reduce_grads(self.params)
            # fp16 (a CUDA device without bf16): the scaler itself skips a step with inf / NaN gradients
            if self.amp.scaler is None and not all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None):
                raise self._diverged("the student's gradient is not finite", gstep)
        self.amp.step(self.opt)

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
