"""The alternating generator / student loop of the GDFQ lineage (methods.md A.2 "Common skeleton",
D.1), one loop for every generator-based method; a method is a game (:mod:`zsq.gen.objectives`).

The student side is the shared QAT engine's (:class:`zsq.qat.engine.QATTrainer`, subclassed): the
``qat`` layout, the FP teacher copy (frozen, eval), the student in eval mode (BN statistics frozen,
BN affine parameters trained), per-channel min-max weight ranges refreshed before every step,
per-tensor EMA activation ranges (momentum 0.9, bias-corrected) during the first ``ema_epochs``
epochs and frozen afterwards, KD from :func:`zsq.qat.engine.kd_loss`, SGD(-Nesterov) for the
student, deterministic per-step random generators (:func:`zsq.qat.engine.step_seed`), the
per-epoch checkpoint with a SHA-256 trailer and exact resume, Ctrl-C handling, the progress bar and
the loss history. What this module adds, per iteration ``(epoch, step)``:

1. **generator step(s)** (``g_steps``): draw latents / labels from the step's generator, make images,
   run the teacher (with the game's BN-statistics loss hooked on it; GDFQ's ``gdfq`` variant) and, if
   the game needs it, the student; minimise the game's ``generator_loss`` with Adam (lr 1e-3,
   betas (0.5, 0.999)); gradients go to the generator only;
2. **student step(s)** (``s_steps``): on the generator step's images, detached, with the teacher
   logits of that pass (GDFQ: ``self.forward(images.detach(), output_teacher_batch.detach())``), or on
   a fresh batch per step for games with ``fresh_batches`` (ZAQ, DFQ-AKD); minimise the game's
   ``student_loss``. During the first ``warmup_epochs`` epochs the student is **not** trained (the
   official ``if epoch >= warmup_epochs: backward_S``) while its losses are still measured (one
   student pass per iteration, also for games with several student steps) and, during
   ``ema_epochs``, its activation ranges follow the EMA of every student forward of the step, as the
   official ``QuantAct`` updates on every forward while unfrozen.

Games with ``s_first`` (ZAQ) run the student steps before the generator step.

**Schedules.** ``lr_schedule="multistep"`` (official): both learning rates x``lr_decay`` (0.1) at the
epochs ``milestones`` (fractions of ``epochs``: 0.25/0.5/0.75 = GDFQ's 100/200/300 of 400), the
student's from epoch 0 as in the official ``LRPolicy`` (its lr is unused during the warm-up);
``"cosine"``: per step over the run for the generator, over the steps after the warm-up for the
student. AIT (``ait=True``): the gradient-inundation optimizer (:mod:`zsq.gen.ait`) on the quantized
weights and no CE in the student loss; its threshold decays with the same milestones.

**Not as the official code.** (1) Each run reports its last epoch (the official scripts keep the
best test epoch). (2) The student stays in eval mode also for ZAQ and DFQ-AKD (their codes train
the student in train mode, updating BN statistics); the generator stays in train mode (DFQ-AKD's
code switches it to eval for the student steps). (3) Activation ranges: the engine's observer (one
bias correction; clipped STE) - see :mod:`zsq.qat.engine`.

**Determinism and resume.** Every draw of iteration ``(epoch, step)`` (latents, labels, Qimera's
mixing) comes from one ``torch.Generator`` seeded with ``step_seed(seed, epoch, step)``; the
generator's initial weights from ``step_seed(seed, -1, 0)``. ``ckpt_dir/gen.pt`` holds the student,
both optimizers, the generator (weights and BN running statistics), the EMA observers and the
history under a fingerprint of the config, the game, the seed, the initial student and generator;
a resumed run ends with tensors equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import setting, to_bool, to_float, to_int
from ..errors import BadValueError
from ..qat.engine import KD_REDUCTIONS, QATConfig, QATTrainer, refresh_weight_ranges, step_seed
from ..quant.modules import QUANT_LAYERS
from ..record import model_info, record_of
from ..train import Fingerprint, cosine_lr, seeded_generator, state_copy
from .ait import InundationSGD
from .objectives import Game, Play, Sample

#: the :class:`~zsq.qat.engine.QATConfig` fields the generator loop reads; the others belong to the
#: fixed-set loop (augmentation, student BNS, the noise-optimization methods' terms) and must stay
#: at their defaults here
STUDENT_FIELDS = frozenset({"epochs", "steps_per_epoch", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                            "temperature", "kd_weight", "kd_reduction", "ce_weight", "ema_epochs", "ema_momentum",
                            "precision", "channels_last"})
CKPT_NAME = "gen.pt"
CKPT_FORMAT = "zsq-gen-1"
LR_SCHEDULES = ("multistep", "cosine")


@dataclass
class GenConfig(QATConfig):
    """The loop's hyperparameters: :class:`~zsq.qat.engine.QATConfig` (student side) with the GDFQ
    lineage's CIFAR defaults [code: xushoukai/GDFQ cifar100_resnet20.hocon, trainer.py] and the
    generator side. ``epochs`` x ``steps_per_epoch`` iterations of ``batch_size`` generated images;
    ``lr`` / ``lr_g`` for the student (SGD, ``momentum``, ``nesterov``, ``weight_decay``) and the
    generator (Adam, ``g_betas``); ``lr_schedule``, ``milestones`` (fractions of ``epochs``),
    ``lr_decay``; ``warmup_epochs`` without student training, ``ema_epochs`` with EMA activation
    ranges; KD: ``kd_weight`` (alpha), ``temperature``, ``kd_reduction`` (``mean``: the code's
    ``KLDivLoss()``); ``ce_weight`` on the sampled labels; ``ait``: gradient inundation with
    ``gi_threshold`` (passing threshold) and ``gi_iters`` bisection steps, KL-only student loss."""

    epochs: int = setting(400, minimum=1)  # nEpochs
    steps_per_epoch: int = setting(200, minimum=1)  # iters = 200
    batch_size: int = setting(200, minimum=1)  # batchSize (AdaSG/AdaDFQ 16; ImageNet 16)
    lr: float = 1e-4  # lr_S (ImageNet 1e-6)
    kd_weight: float = 1.0  # alpha
    kd_reduction: str = setting("mean", choices=KD_REDUCTIONS)  # nn.KLDivLoss() default reduction
    ce_weight: float = 1.0  # loss_fn_kd: KL * alpha * T^2 + CE(output, labels)
    augment: bool = False
    lr_g: float = 1e-3
    g_betas: tuple[float, float] = (0.5, 0.999)  # b1, b2
    lr_schedule: str = setting("multistep", choices=LR_SCHEDULES)
    milestones: tuple[float, ...] = (0.25, 0.5, 0.75)  # step_S = step_G = [100, 200, 300] of 400
    lr_decay: float = 0.1
    warmup_epochs: int = 4  # warmup_epochs (ImageNet 50)
    ait: bool = False
    gi_threshold: float = 1e-3  # AIT run_cifar10_4bit.sh --passing_threshold 0.001 (code default 1e-4)
    gi_iters: int = 5  # --alpha_iter

    def __post_init__(self):
        for name in ("lr_g", "lr_decay", "gi_threshold"):
            setattr(self, name, to_float(getattr(self, name), name, finite=True))
        for name in ("warmup_epochs", "gi_iters"):
            setattr(self, name, to_int(getattr(self, name), name))
        self.ait = to_bool(self.ait, "ait")
        try:
            self.g_betas = tuple(float(b) for b in self.g_betas)
            self.milestones = tuple(sorted(float(m) for m in self.milestones))
        except (TypeError, ValueError):
            raise BadValueError("g_betas and milestones expect lists of numbers") from None
        if len(self.g_betas) != 2 or not all(0 <= b < 1 for b in self.g_betas):
            raise BadValueError(f"g_betas expects two numbers in [0, 1), got {list(self.g_betas)}")
        if not all(0 < m < 1 for m in self.milestones):
            raise BadValueError(f"milestones are fractions of the epochs in (0, 1), got {list(self.milestones)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BadValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{self.lr_schedule}'")
        if self.lr_g < 0 or not 0 < self.lr_decay <= 1 or self.warmup_epochs < 0 or self.gi_threshold <= 0 \
                or self.gi_iters < 1:
            raise BadValueError("lr_g >= 0, 0 < lr_decay <= 1, warmup_epochs >= 0, gi_threshold > 0 and gi_iters >= 1 "
                                f"needed, got {self.lr_g}, {self.lr_decay}, {self.warmup_epochs}, "
                                f"{self.gi_threshold}, {self.gi_iters}")
        super().__post_init__()
        unused = [f.name for f in dataclasses.fields(QATConfig) if f.name not in STUDENT_FIELDS
                  and getattr(self, f.name) != GenConfig.__dataclass_fields__[f.name].default]
        if unused:
            raise BadValueError(f"{', '.join(unused)} belong(s) to the fixed-set QAT loop, not to a generator game "
                                "(whose BNS weight is its own hparam, e.g. bns_g)")
        if self.total_steps <= self.warmup_steps:
            raise BadValueError(f"{self.total_steps} iterations leave none to train the student after "
                                f"{self.warmup_steps} warm-up iterations: raise epochs or lower warmup_epochs")

    @property
    def warmup_steps(self) -> int:
        """Iterations without student training: ``warmup_epochs`` epochs, or 2% of the iterations
        when the run has no more epochs than that (0 for ``warmup_epochs=0``)."""
        if self.warmup_epochs == 0:
            return 0
        if self.epochs > self.warmup_epochs:
            return self.warmup_epochs * self.steps_per_epoch
        return max(1, math.ceil(0.02 * self.total_steps))

    def decays(self, gstep: int) -> int:
        """How many milestones lie at or before iteration ``gstep`` (multi-step schedule; a milestone
        ``m`` is iteration ``round(m * total_steps)``: GDFQ's epoch 100 of 400 for m = 0.25)."""
        return sum(gstep >= round(m * self.total_steps) for m in self.milestones)


class GenTrainer(QATTrainer):
    """Trains ``generator`` and ``student`` (fresh from ``apply_protocol``) in place by the ``game``
    against the FP ``teacher``; see the module docstring. ``stop_at`` / ``callback`` as
    :class:`~zsq.qat.engine.QATTrainer`; ``num_classes`` for the labels."""

    def __init__(self, student: nn.Module, teacher: nn.Module, generator: nn.Module, game: Game, cfg: GenConfig,
                 num_classes: int, *, seed: int = 0, progress: bool = True, ckpt_dir: str | Path | None = None,
                 resume: bool = False, stop_at: tuple[int, int] | None = None,
                 callback: Callable[[int, int, float], None] | None = None):
        size = int(generator.image_size)
        placeholder = torch.zeros(1, 3, size, size)  # the engine's fixed set; batches come from the generator
        super().__init__(student, teacher, placeholder, cfg, seed=seed, progress=progress, ckpt_dir=ckpt_dir,
                         resume=resume, stop_at=stop_at, callback=callback)
        self.gen, self.game, self.num_classes = generator.to(self.device), game, int(num_classes)
        self.ckpt = Path(ckpt_dir) / CKPT_NAME if ckpt_dir else None
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=cfg.lr_g, betas=cfg.g_betas)
        if cfg.ait:
            self.opt = _inundation_optimizer(student, cfg)
        self.bns_t = game.make_bns(self.teacher)
        self._feats: dict[int, dict[str, Tensor]] = {}
        self._feat_names: list[str] = []
        self._feat_handles: list[Any] = []
        self._last: tuple[Tensor, Tensor, Sample] | None = None
        game.setup(self)
        h = Fingerprint(self.fingerprint.encode()).settings(game.to_dict())
        self.fingerprint = h.state(self.gen.state_dict(), dtype=False).hexdigest()

    # -- features (ZAQ) ------------------------------------------------------------------------------
    def feature_hooks(self, names: list[str]) -> None:
        """Record the outputs of the modules ``names`` of the student and the teacher at every forward."""
        self._feat_names = list(names)
        for model in (self.q, self.teacher):
            store = self._feats.setdefault(id(model), {})
            mods = dict(model.named_modules())
            for n in names:
                self._feat_handles.append(
                    mods[n].register_forward_hook(lambda m, i, o, n=n, store=store: store.__setitem__(n, o)))

    def _features(self, model: nn.Module) -> list[Tensor]:
        store = self._feats.get(id(model), {})
        return [store[n] for n in self._feat_names]

    def run(self) -> nn.Module:
        try:
            return super().run()
        finally:
            for h in self._feat_handles:
                h.remove()
            self._feat_handles, self._feats, self._last = [], {}, None

    # -- checkpoints ---------------------------------------------------------------------------------
    ckpt_format = CKPT_FORMAT
    ckpt_what = "generator QAT checkpoint"

    def _ckpt_extra(self) -> dict[str, Any]:
        return {"generator": state_copy(self.gen), "optimizer_g": self.opt_g.state_dict()}

    def _ckpt_restore(self, ck: dict[str, Any]) -> None:
        self.gen.load_state_dict(ck["generator"])
        self.opt_g.load_state_dict(ck["optimizer_g"])

    # -- schedules -----------------------------------------------------------------------------------
    def lr_at(self, gstep: int) -> float:
        """The student's learning rate at iteration ``gstep`` (0 during the warm-up)."""
        cfg = self.cfg
        if gstep < cfg.warmup_steps:
            return 0.0
        if cfg.lr_schedule == "cosine":
            return cosine_lr(cfg.lr, gstep - cfg.warmup_steps, cfg.total_steps - cfg.warmup_steps)
        return cfg.lr * cfg.lr_decay ** cfg.decays(gstep)

    def lr_g_at(self, gstep: int) -> float:
        cfg = self.cfg
        if cfg.lr_schedule == "cosine":
            return cosine_lr(cfg.lr_g, gstep, cfg.total_steps)
        return cfg.lr_g * cfg.lr_decay ** cfg.decays(gstep)

    def _set_lrs(self, epoch: int, gstep: int) -> None:
        cfg = self.cfg
        for grp in self.opt.param_groups:
            grp["lr"] = self.lr_at(gstep)
            if grp.get("gi"):
                grp["threshold"] = cfg.gi_threshold * cfg.lr_decay ** cfg.decays(gstep)
                grp["capped"] = gstep < cfg.warmup_steps + cfg.steps_per_epoch  # the code's disable_adalr
        for grp in self.opt_g.param_groups:
            grp["lr"] = self.lr_g_at(gstep)

    # -- one iteration -------------------------------------------------------------------------------
    def _images(self, sample: Sample) -> Tensor:
        dev = self.device
        x = self.gen(sample.z.to(dev), None if sample.labels is None else sample.labels.to(dev),
                     None if sample.mix is None else sample.mix.to(dev))
        return x.contiguous(memory_format=torch.channels_last if self.cfg.channels_last else torch.contiguous_format)

    def _play(self, x: Tensor, t: Tensor, s: Tensor | None, sample: Sample, gstep: int, bns=None) -> Play:
        dev = self.device
        if sample.target is not None:
            sample = dataclasses.replace(sample, target=sample.target.to(dev))
        return Play(x=x, t=t.float(), s=None if s is None else s.float(), sample=sample, cfg=self.cfg, bns=bns,
                    t_feats=self._features(self.teacher), s_feats=self._features(self.q) if s is not None else [],
                    warmup=gstep < self.cfg.warmup_steps)

    def _g_step(self, g: torch.Generator, gstep: int) -> dict[str, float]:
        game = self.game
        sample = game.sample(g, self.cfg.batch_size, self.num_classes)
        x = self._images(sample)
        with self.bns_t if self.bns_t is not None else contextlib.nullcontext(), self._autocast():
            t = self.teacher(x)
            bns = self.bns_t.loss() if self.bns_t is not None else None
        with self._autocast():
            s = self.q(x) if game.student_in_g else None
        terms = game.generator_loss(self._play(x, t, s, sample, gstep, bns))
        params = [p for p in self.gen.parameters() if p.requires_grad]
        grads = torch.autograd.grad(terms["total"], params)  # the generator's only: no student weight grads
        for p, gr in zip(params, grads):
            p.grad = gr
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        self._last = (x.detach(), t.detach().float(), sample)
        return {f"g_{k}": float(v.detach()) for k, v in terms.items()}

    def _s_step(self, g: torch.Generator, gstep: int) -> dict[str, float]:
        if self.game.fresh_batches or self._last is None:
            sample = self.game.sample(g, self.cfg.batch_size, self.num_classes)
            with torch.no_grad(), self._autocast():
                x = self._images(sample)
                t = self.teacher(x).float()
        else:
            x, t, sample = self._last
        train = gstep >= self.cfg.warmup_steps
        with contextlib.nullcontext() if train else torch.no_grad(), self._autocast():
            s = self.q(x)
        terms = self.game.student_loss(self._play(x, t, s, sample, gstep))
        if train:
            self._update(terms["total"], gstep)
        return {k: float(v.detach()) for k, v in terms.items()}

    def _step(self, epoch: int, step: int) -> dict[str, float]:
        """One iteration: generator step(s) and student step(s) in the game's order (module docstring)."""
        cfg = self.cfg
        gstep = epoch * cfg.steps_per_epoch + step
        g = seeded_generator(step_seed(self.seed, epoch, step))
        self.gen.train()
        self._set_lrs(epoch, gstep)
        self._last = None
        out: dict[str, float] = {}
        self._ema_on = gstep < cfg.ema_steps
        try:
            # during the warm-up one student forward per iteration (EMA ranges, measured losses) is enough
            n_s = self.game.s_steps if gstep >= cfg.warmup_steps else 1
            for phase in (("s", "g") if self.game.s_first else ("g", "s")):
                for _ in range(self.game.g_steps if phase == "g" else n_s):
                    refresh_weight_ranges(self.q)  # the code quantizes the current weights at every forward
                    out.update(self._g_step(g, gstep) if phase == "g" else self._s_step(g, gstep))
        finally:
            self._ema_on = False
        self.steps_run += 1
        return out


def _inundation_optimizer(student: nn.Module, cfg: GenConfig) -> InundationSGD:
    """AIT's split: quantized weights with gradient inundation, every other parameter plain SGD."""
    quant, bits = [], []
    for m in student.modules():
        if isinstance(m, QUANT_LAYERS):
            quant.append(m.weight)
            bits.append(int(m.wq.bits))
    ids = {id(p) for p in quant}
    rest = [p for p in student.parameters() if id(p) not in ids]
    return InundationSGD([{"params": quant, "gi": True, "bits": bits}, {"params": rest}], lr=cfg.lr,
                         momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                         threshold=cfg.gi_threshold, iters=cfg.gi_iters)


def gen_finetune(student: nn.Module, teacher: nn.Module, game: Game, cfg: GenConfig, num_classes: int,
                 image_size: int, *, seed: int = 0, **kw) -> nn.Module:
    """Build the game's generator (initial weights from ``seed``) and train it against ``student``
    (fresh from ``apply_protocol``) in place; the result's record carries ``methods["qat"]`` (per-epoch
    mean losses, iterations run in this call, warm-up / EMA iterations, ms per iteration) and
    ``generator`` (the trained generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(seed, -1, 0))
        gen = game.make_generator(num_classes, image_size)
    tr = GenTrainer(student, teacher, gen, game, cfg, num_classes, seed=seed, **kw)
    q = tr.run()
    rec = record_of(q)
    rec.methods["qat"] = {"epochs": tr.history, "steps_run": tr.steps_run, "warmup_steps": cfg.warmup_steps,
                          "ema_steps": cfg.ema_steps, "total_steps": cfg.total_steps, "game": game.to_dict(),
                          "ms_per_step": round(1000 * tr.wall_s / tr.steps_run, 1) if tr.steps_run else None}
    rec.generator = gen.eval()  # outside the module tree: q's state dict stays the student's
    return q


def quantize_gen(ctx, game_name: str, **defaults: Any) -> nn.Module:
    """A generator quantizer: lay the model out by ``ctx.protocol`` (min-max weights), then play
    ``game_name`` (hparams: :class:`GenConfig` and the game's fields; ``defaults`` fill keys the
    hparams lack; ``stop_at`` is a test hook). Calibration images in ``ctx.images`` are not used."""
    from ..quant.protocol import apply_protocol
    from .objectives import get_game

    hp = {**defaults, **dict(ctx.hparams or {})}
    game = get_game(game_name, hp)
    cfg = GenConfig.from_hparams(hp)
    info = model_info(ctx.model)
    num_classes = getattr(info, "num_classes", None)
    size = getattr(getattr(info, "preprocess", None), "input_size", None)
    if not num_classes or not size:
        raise BadValueError("generator methods need the model's class count and input size (load it with "
                            "zsq.load_model, or give --num-classes / the preprocessing)")
    student = apply_protocol(ctx.model, ctx.protocol, ctx.w_bits, ctx.a_bits, policy=ctx.policy,
                             w_observer="minmax", a_observer="minmax", strict=ctx.strict)
    stop_at = hp.get("stop_at")
    return gen_finetune(student, ctx.model, game, cfg, int(num_classes), int(size), seed=ctx.seed,
                        progress=ctx.progress, ckpt_dir=ctx.ckpt_dir, resume=ctx.resume,
                        stop_at=tuple(stop_at) if stop_at is not None else None)
