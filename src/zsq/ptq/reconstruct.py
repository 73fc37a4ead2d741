"""Block reconstruction: AdaRound, BRECQ, QDrop and Genie-M on one engine (methods.md C.6, A.3).

The quantized model (any protocol layout from :func:`zsq.quant.protocol.apply_protocol`) is
reconstructed **unit by unit in network order**. A unit is a residual block
(:func:`zsq.quant.graph.is_block`) or, where there is none, a lone Conv2d/Linear
(``granularity="layer"`` makes every layer its own unit: AdaRound). For unit ``j``:

1. cache, over the calibration images, the FP model's input ``x`` and output ``y`` of the unit and
   the quantized model's input ``x_q`` (the earlier units already reconstructed; forwards stop at the
   unit, teacher passes run under ``torch.inference_mode``);
2. initialise the activation quantizers the unit owns (L_p search, p = 2.4, on ``x_q``, in forward
   order, each seeing the earlier ones quantized), swap its layers' weight quantizers for
   :class:`~zsq.quant.adaround.AdaRoundQuantizer` (floor fixed, rounding logits learnt; optionally a
   learnt step: Genie-M);
3. minimise ``sum_c (unit(x_in) - y)^2`` (mean over batch and positions) + ``round_weight *
   sum(1 - |2h - 1|^beta)`` with ``beta`` annealed 20 -> 2 after a 20% warm-up. QDrop: ``x_in`` is
   an elementwise random mix of ``x_q`` and ``x`` and every owned activation quantizer passes each
   element through unquantized with probability ``drop_prob`` (training only);
4. hard-round, bake the rounded weights into ``layer.weight`` and the learnt steps into the plain
   quantizers: the model is again zsq's standard structure (``zsq.save`` / ``zsq.load`` work).

**Which activation quantizers a unit owns**: :mod:`zsq.ptq.recon_units` (with the units, the passes'
:class:`ReconConfig` and the methods' presets).

**Determinism and resume.** Every random draw of step ``t`` of unit ``u`` in pass ``p`` comes from
the global RNG re-seeded with a hash of ``(seed, p, u, t)``, so a run continued from a checkpoint
draws exactly what the uninterrupted run drew. ``ckpt_dir/recon.pt`` is rewritten atomically after
every unit (the model state) and every ``ckpt_every_s`` seconds, on Ctrl-C and at ``stop_at``
inside a unit (plus the unit's trainable tensors and optimizer states); ``resume=True`` skips the
finished units and continues the unfinished one from its step. Ctrl-C finishes the current step, writes
the checkpoint at that step and raises ``KeyboardInterrupt`` (a second Ctrl-C stops at once, leaving the
last checkpoint); the seeds, schedule and checkpoint parts are :mod:`zsq.train`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, setting
from ..data.augment import AUGMENT_MODES, augment_set
from ..errors import BadValueError
from ..hardware import Amp
from ..quant.adaround import AdaRoundQuantizer
from ..quant.modules import Quantizer
from ..quant.observers import WEIGHT_OBSERVERS
from ..quant.protocol import frozen_fp_copy
from ..record import record_of
from ..train import (Every, Fingerprint, NestedBar, cosine_lr, deferred_sigint, derive_seed, read_checkpoint,
                     state_copy, stop_if_interrupted, write_checkpoint)
from .recon_units import (  # noqa: F401 - the passes, units and presets, importable from here too
    GRANULARITIES, PRECISIONS, RECON_METHODS, W_SCALE_PARAMS, BrecqActConfig, ReconConfig, Unit, _act_quantizers,
    _inside, _placement, find_units, method_passes,
)


@dataclass
class ReconEngineConfig(Config):
    """The reconstruction quantizers' options besides the passes' :class:`ReconConfig` fields (recipe
    hparams of the same names; :func:`quantize_reconstruct` reads them)."""

    ckpt_every_s: float = 120.0  # seconds between the mid-unit checkpoints
    augment: str = setting("none", choices=AUGMENT_MODES)  # augmented copies of the calibration set (zsq.data.augment)
    augment_copies: int = setting(1, minimum=1)  # copies of each calibration image (augment != none)
    augment_pad: int = setting(4, minimum=0)  # pixels of padding of flipshift's random shift
    w_observer: str = setting("mse", choices=WEIGHT_OBSERVERS)  # the weights' initial grid (apply_protocol's observer)
    stop_at: tuple[int, int, int] | None = None  # (pass, unit, step): checkpoint and stop there (a test hook)


CKPT_NAME = "recon.pt"
CKPT_FORMAT = "zsq-recon-2"  # 2: SHA-256 trailer (paths.torch_save_checked)


class ReconInterrupted(Exception):
    """Raised at ``stop_at`` (tests) after the checkpoint is written."""


class _Stop(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def step_seed(seed: int, pass_idx: int, unit_idx: int, step: int) -> int:
    return derive_seed("zsq-recon", seed, pass_idx, unit_idx, step)


def _beta(count: int, iters: int, warmup: float, b_range: tuple[float, float]) -> float:
    """Genie/QDrop LinearTempDecay (``count`` is 1-based)."""
    start = warmup * iters
    if count < start:
        return b_range[0]
    rel = (count - start) / max(iters - start, 1e-12)
    return b_range[1] + (b_range[0] - b_range[1]) * max(0.0, 1.0 - rel)


def _to_buffer(q: nn.Module) -> None:
    """A learnt step (nn.Parameter) back to a plain buffer (zsq's standard structure)."""
    if isinstance(getattr(q, "scale", None), nn.Parameter):
        s = q.scale.detach().clone()
        del q.scale
        q.register_buffer("scale", s)


def _fingerprint(images: torch.Tensor, passes: list[ReconConfig], seed: int, extra: dict) -> str:
    h = Fingerprint().settings({"passes": [p.to_dict() for p in passes], "seed": int(seed), **extra})
    return h.tensor(images).hexdigest()


# --------------------------------------------------------------------------------------------------
# fast training-time activation quantization (LSQ + QDrop in one autograd node)
# --------------------------------------------------------------------------------------------------
_BITS8 = torch.arange(8, dtype=torch.uint8)


def drop_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Float mask, 1 with probability ``p`` (elementwise), from the global RNG. ``p = 0.5`` (QDrop's
    value) unpacks 8 random bits per byte, several times cheaper than ``rand_like`` on CPU."""
    n = like.numel()
    if p == 0.5:
        r = torch.randint(0, 256, ((n + 7) // 8, 1), dtype=torch.uint8, device=like.device)
        m = ((r >> _BITS8.to(like.device)) & 1).view(-1)[:n]
    else:
        m = torch.rand(n, device=like.device) < p
    return m.to(like.dtype).view(like.shape)


class _LSQDrop(torch.autograd.Function):
    """``lerp(fake_quant(x), x, m)``: the fake quantizer of :mod:`zsq.quant.fake` (clamp, then
    straight-through round; LSQ gradient for the step) with QDrop's elementwise mask ``m`` (1 = keep
    FP), written as arithmetic only: ``torch.where`` / comparisons are the slow ops on CPU."""

    @staticmethod
    def forward(ctx, x, s, zp, qmin, qmax, m):
        v = x / s + zp
        vc = v.clamp(qmin, qmax)
        q = vc.round()
        xq = (q - zp) * s
        out = xq if m is None else torch.lerp(xq, x, m)
        ctx.save_for_backward(v, vc, q, zp, m)
        return out

    @staticmethod
    def backward(ctx, g):
        v, vc, q, zp, m = ctx.saved_tensors
        inside = (v == vc).to(g.dtype)
        keep_q = g if m is None else g * (1.0 - m)
        gx = g * inside if m is None else g * (inside + m - m * inside)
        gs = None
        if ctx.needs_input_grad[1]:
            gs = (keep_q * ((q - zp) - inside * (v - zp))).sum().reshape(1)
        return gx, gs, None, None, None, None


class _TrainActQuant(nn.Module):
    """Stands in for a per-tensor activation :class:`Quantizer` while its unit trains (same step
    parameter, same integer grid; QDrop's ``drop_prob`` applied in train mode)."""

    def __init__(self, q: Quantizer):
        super().__init__()
        self.q = q

    def forward(self, x):
        q = self.q
        if q.mode != "quant":
            return q(x)
        m = drop_mask(x, q.drop_prob) if (q.training and q.drop_prob > 0) else None
        s = q.scale.reshape(())
        zp = q.zero_point.reshape(())
        return _LSQDrop.apply(x, s, zp, q.qmin, q.qmax, m)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


# --------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------
class Reconstructor:
    """Runs ``passes`` (a list of :class:`ReconConfig`) over the units of ``qmodel`` in place.

    ``qmodel`` must come straight from ``apply_protocol`` (weights at their initial grid, activation
    quantizers not yet calibrated); the FP teacher is a copy of it with every quantizer off, so its
    structure (folded BN or not) is the same.
    """

    def __init__(self, qmodel: nn.Module, images: torch.Tensor, passes: list[ReconConfig], *, seed: int = 0,
                 placement: str | None = None, progress: bool = True, ckpt_dir: str | Path | None = None,
                 resume: bool = False, ckpt_every_s: float = 120.0,
                 stop_at: tuple[int, int, int] | None = None, only: list[str] | None = None):
        if images is None or images.dim() != 4 or images.shape[0] < 1:
            raise BadValueError("block reconstruction needs calibration images (a synthesizer, --synthetic or --calib)")
        if not passes:
            raise BadValueError("no reconstruction pass given")
        self.q = qmodel
        # the calibration set lives on the model's device (every unit's cached inputs and outputs with it)
        self.images = images.detach().float().to(next((p.device for p in qmodel.parameters()), images.device))
        self.passes = passes
        self.seed = int(seed)
        layout = record_of(qmodel).layout
        self.placement = placement or _placement(layout)
        self.progress = progress
        self.ckpt = Path(ckpt_dir) / CKPT_NAME if ckpt_dir else None
        self.resume = resume
        self.ckpt_every_s = float(ckpt_every_s)
        self.stop_at = tuple(stop_at) if stop_at is not None else None
        self.stats: list[dict[str, Any]] = []
        self.steps_run = 0
        self.only = set(only) if only is not None else None
        self._fast: dict[str, nn.Module] = {}
        self._sigint: dict[str, bool] = {"hit": False}  # a Ctrl-C during run() (zsq.interrupt)

        for _, q in _act_quantizers(qmodel):
            q.mode = "off"
            q.initialized = False
        self.teacher = frozen_fp_copy(qmodel)
        self.q.eval()
        self._grad_flags = [(p, p.requires_grad) for p in qmodel.parameters()]
        for p in qmodel.parameters():  # only what a unit learns gets gradients
            p.requires_grad_(False)
        self.fingerprint = _fingerprint(self.images, passes, self.seed,
                                        {"placement": self.placement,
                                         "layout": layout.to_dict() if layout is not None else None})

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self, done: list[list[int]], partial: dict | None) -> None:
        if self.ckpt is None:
            return
        write_checkpoint(self.ckpt, CKPT_FORMAT, self.fingerprint, {
            "done": done, "model": state_copy(self.q) if partial is None else self._boundary_state,
            "partial": partial, "stats": self.stats})

    def _load(self) -> dict | None:
        if not self.resume:
            return None
        return read_checkpoint(self.ckpt, "reconstruction checkpoint", CKPT_FORMAT, self.fingerprint)

    # -- caching -------------------------------------------------------------------------------------
    def _run_to(self, model: nn.Module, unit_mod: nn.Module, x: torch.Tensor, want_out: bool):
        box = {}
        if want_out:
            def hook(mod, args, out):
                box["in"], box["out"] = args[0], out
                raise _Stop
            h = unit_mod.register_forward_hook(hook)
        else:
            def hook(mod, args):
                box["in"] = args[0]
                raise _Stop
            h = unit_mod.register_forward_pre_hook(hook)
        try:
            model(x)
        except _Stop:
            pass
        finally:
            h.remove()
        return box

    def _cache(self, unit: Unit, cfg: ReconConfig):
        t_mod = self.teacher.get_submodule(unit.name)
        xs, ys, xqs = [], [], []
        with torch.inference_mode():
            for b in torch.split(self.images, cfg.cache_batch):
                r = self._run_to(self.teacher, t_mod, b, True)
                xs.append(r["in"].float())
                ys.append(r["out"].float())
                xqs.append(self._run_to(self.q, unit.module, b, False)["in"].float())
        fmt = torch.channels_last if (cfg.channels_last and xs[0].dim() == 4) else torch.contiguous_format
        cat = lambda ts: torch.cat(ts).contiguous(memory_format=fmt) if ts[0].dim() == 4 else torch.cat(ts)  # noqa: E731
        return cat(xs).clone(), cat(ys).clone(), cat(xqs).clone()

    def _unit_forward(self, unit: Unit, x: torch.Tensor) -> torch.Tensor:
        for n, q in unit.inputs:
            x = self._fast.get(n, q)(x)
        return unit.module(x)

    @torch.no_grad()
    def _init_acts(self, unit: Unit, xq: torch.Tensor, cfg: ReconConfig) -> None:
        todo = [(n, q) for n, q in unit.owned if not q.initialized]
        if not todo:
            return
        sample = xq[: cfg.a_init_images]
        for _, q in todo:  # forward order; each sees the earlier ones quantized
            q.start_observing(cfg.a_observer)
            for b in torch.split(sample, cfg.cache_batch):
                self._unit_forward(unit, b)
            q.finish_observing()

    @torch.no_grad()
    def _init_orphans(self, before: Unit | None, cfg: ReconConfig) -> None:
        todo = [(n, q) for n, q in self._orphans if not q.initialized and
                (before is None or self._q_order.get(n, 1 << 30) < self._u_order[before.name])]
        if not todo or not cfg.act_quant:
            return
        sample = self.images[: cfg.a_init_images]
        for _, q in todo:
            q.start_observing(cfg.a_observer)
            with torch.inference_mode():
                for b in torch.split(sample, cfg.cache_batch):
                    if before is None:
                        self.q(b)
                    else:
                        self._run_to(self.q, before.module, b, False)
            q.finish_observing()

    # -- one unit --------------------------------------------------------------------------------------
    def _train_unit(self, pi: int, ui: int, unit: Unit, cfg: ReconConfig, done: list, partial: dict | None,
                    bar: NestedBar) -> None:
        t0 = time.perf_counter()
        self._boundary_state = state_copy(self.q)
        x, y, xq = self._cache(unit, cfg)
        if cfg.act_quant:
            self._init_acts(unit, xq, cfg)
        learn_w = cfg.learn_weights and not unit.skip
        learn_a = cfg.act_quant and cfg.lr_a_scale > 0 and not unit.skip
        ada: list[tuple[nn.Module, Quantizer, AdaRoundQuantizer]] = []
        if learn_w:
            for _, layer in unit.layers:
                wq = layer.wq
                a = AdaRoundQuantizer.from_quantizer(wq, layer.weight,
                                                     learn_scale=cfg.w_scale_param if cfg.lr_w_scale > 0 else False)
                layer.wq = a
                ada.append((layer, wq, a))
        a_params = [q.make_learnable() for _, q in unit.owned] if learn_a else []
        for n, q in unit.owned:
            q.drop_prob = cfg.drop_prob if cfg.act_quant else 0.0
            q.train(True)
            if not q.per_channel:  # the fused LSQ + QDrop node during training
                self._fast[n] = _TrainActQuant(q)
                if _inside(n, unit.name):
                    _swap(self.q, n, self._fast[n])
        iters = int(cfg.iters) if (ada or a_params) else 0
        opt_round = torch.optim.Adam([a.v for *_, a in ada], lr=cfg.lr_round) if ada else None
        w_scales = [a.step_param for *_, a in ada if isinstance(a.step_param, nn.Parameter)]
        groups = []
        if w_scales:
            groups.append({"params": w_scales, "lr": cfg.lr_w_scale, "base": cfg.lr_w_scale})
        if a_params:
            groups.append({"params": a_params, "lr": cfg.lr_a_scale, "base": cfg.lr_a_scale})
        opt_scale = torch.optim.Adam(groups) if groups else None
        start = 0
        if partial is not None:
            start = int(partial["step"])
            for (*_, a), v in zip(ada, partial["v"]):
                a.v.data.copy_(v)
            for (*_, a), s in zip(ada, partial["w_scale"]):
                a.step_param.data.copy_(s)
            for (_, q), s in zip(unit.owned, partial["a_scale"]):
                q.scale.data.copy_(s)
            if opt_round is not None:
                opt_round.load_state_dict(partial["opt_round"])
            if opt_scale is not None:
                opt_scale.load_state_dict(partial["opt_scale"])

        def snapshot(step):
            return {"pass": pi, "unit": ui, "step": step,
                    "v": [a.v.detach().clone() for *_, a in ada],
                    "w_scale": [a.step_param.detach().clone() for *_, a in ada],
                    "a_scale": [q.scale.detach().clone() for _, q in unit.owned],
                    "opt_round": opt_round.state_dict() if opt_round is not None else None,
                    "opt_scale": opt_scale.state_dict() if opt_scale is not None else None}

        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            unit.module.to(memory_format=torch.channels_last)
        amp = Amp(cfg.precision, x.device)  # bf16 / fp32; fp16 + loss scaling on a CUDA device without bf16
        n = x.shape[0]
        bs = min(cfg.batch_size, n)
        label = f"{'' if len(self.passes) == 1 else f'pass {pi + 1} '}{unit.name}"
        bar.start(label, max(iters, 1), start)
        periodic = Every(self.ckpt_every_s)
        t_loop = time.perf_counter()
        first_loss = last_loss = None
        for step in range(start, iters):
            torch.manual_seed(step_seed(self.seed, pi, ui, step))
            idx = torch.randint(0, n, (bs,)).to(x.device)  # drawn on the CPU: the same batches on every device
            xi, yi = x[idx], y[idx]
            if cfg.input_mix >= 1.0:
                xin = xq[idx]
            elif cfg.input_mix <= 0.0:
                xin = xi
            else:
                xin = torch.lerp(xi, xq[idx], drop_mask(xi, cfg.input_mix))
            if xin.dim() == 4:
                xin = xin.contiguous(memory_format=fmt)
            count = step + 1
            for g in (opt_scale.param_groups if opt_scale is not None else []):
                g["lr"] = cosine_lr(g["base"], step, iters)
            with amp.autocast():
                out = self._unit_forward(unit, xin)
            rec = (out.float() - yi).pow(2).sum(1).mean()
            loss = rec
            if ada and count >= cfg.warmup * iters:
                beta = _beta(count, iters, cfg.warmup, cfg.b_range)
                loss = loss + cfg.round_weight * sum(a.regularizer(beta) for *_, a in ada)
            if opt_round is not None:
                opt_round.zero_grad(set_to_none=True)
            if opt_scale is not None:
                opt_scale.zero_grad(set_to_none=True)
            amp.backward(loss)
            amp.step(opt_round, opt_scale)
            self.steps_run += 1
            if step == start or count % 50 == 0 or count == iters:
                last_loss = float(rec.detach())
                if first_loss is None and step == 0:
                    first_loss = last_loss
                bar.update(count, last_loss)
            if self.stop_at is not None and self.stop_at == (pi, ui, count):
                self._save(done, snapshot(count))
                raise ReconInterrupted(f"stopped at pass {pi} unit {ui} step {count}")
            if count < iters:  # Ctrl-C: save at this step and stop (after the last one the unit finishes first)
                stop_if_interrupted(self._sigint, lambda: self._save(done, snapshot(count)))
            if self.ckpt is not None and periodic.due() and count < iters:
                self._save(done, snapshot(count))
                periodic.reset()
        loop_s = time.perf_counter() - t_loop
        # finish: hard rounding baked in, steps back to buffers, QDrop off
        for layer, wq, a in ada:
            a.bake(layer, wq)
            layer.wq = wq
        for n, q in unit.owned:
            if n in self._fast and _inside(n, unit.name):
                _swap(self.q, n, q)
            self._fast.pop(n, None)
            _to_buffer(q)
            q.drop_prob = 0.0
            q.train(False)
        if cfg.channels_last:
            unit.module.to(memory_format=torch.contiguous_format)
        mse_xq = self._xq_loss(unit, xq, y) if iters else None
        bar.end(last_loss)
        self.stats.append({"pass": pi, "unit": unit.name, "iters": iters, "skipped": unit.skip,
                           "loss_first": first_loss, "loss_last": last_loss, "mse_xq": mse_xq,
                           "wall_s": round(time.perf_counter() - t0, 3), "loop_s": round(loop_s, 3)})

    @torch.no_grad()
    def _xq_loss(self, unit: Unit, xq: torch.Tensor, y: torch.Tensor) -> float:
        """The finished (hard-rounded) unit's reconstruction loss on the quantized model's inputs of the
        first 256 calibration images: the images it trained on, not held-out ones."""
        k = min(256, xq.shape[0])
        out = self._unit_forward(unit, xq[:k].contiguous())
        return float((out.float() - y[:k]).pow(2).sum(1).mean())

    # -- all units -------------------------------------------------------------------------------------
    def run(self) -> nn.Module:
        example = self.images[:2]
        cfg0 = self.passes[0]
        units, orphans = find_units(self.q, example, cfg0.granularity, self.placement, cfg0.skip_first)
        self.units, self._orphans = units, orphans
        if self.only is not None:
            unknown = self.only - {u.name for u in units}
            if unknown:
                raise BadValueError(f"no reconstruction unit named {', '.join(sorted(unknown))} "
                                    f"(units: {', '.join(u.name for u in units)})")
            for u in units:
                u.skip = u.skip or u.name not in self.only
        ev: dict[tuple[str, str], int] = {}

        def mark(key):
            def hook(*_):
                ev.setdefault(key, len(ev))  # returns None: the hook must not replace inputs/outputs
            return hook

        hooks = [u.module.register_forward_pre_hook(mark(("u", u.name))) for u in units]
        hooks += [q.register_forward_hook(mark(("q", n))) for n, q in orphans]
        with torch.inference_mode():
            self.q(example)
        for h in hooks:
            h.remove()
        self._u_order = {u.name: ev.get(("u", u.name), 1 << 30) for u in units}
        self._q_order = {n: ev.get(("q", n), 1 << 30) for n, _ in orphans}

        done: list[list[int]] = []
        partial = None
        ck = self._load()
        if ck is not None:
            self.q.load_state_dict(ck["model"])
            done = [list(d) for d in ck["done"]]
            partial = ck["partial"]
            self.stats = list(ck.get("stats") or [])
        done_set = {tuple(d) for d in done}
        with NestedBar(self.progress) as bar, deferred_sigint() as self._sigint:
            for pi, cfg in enumerate(self.passes):
                if pi > 0 and cfg.granularity != self.passes[pi - 1].granularity:
                    raise BadValueError("all passes of one reconstruction must share the granularity")
                for ui, unit in enumerate(units):
                    if (pi, ui) in done_set:
                        continue
                    if not cfg.act_quant:
                        for _, q in _act_quantizers(self.q):
                            q.mode = "off"
                    self._init_orphans(unit, cfg)
                    p = partial if partial is not None and (partial["pass"], partial["unit"]) == (pi, ui) else None
                    self._train_unit(pi, ui, unit, cfg, done, p, bar)
                    partial = None
                    done.append([pi, ui])
                    done_set.add((pi, ui))
                    self._save(done, None)
                    stop_if_interrupted(self._sigint)
                self._init_orphans(None, cfg)
        for _, q in _act_quantizers(self.q):
            if not q.initialized:  # act_quant off in every pass: calibrate at the end
                q.mode = "off"
        self.q.eval()
        for p, rg in self._grad_flags:
            p.requires_grad_(rg)
        return self.q


def reconstruct(qmodel: nn.Module, images: torch.Tensor, passes: ReconConfig | list[ReconConfig], **kw) -> nn.Module:
    """Reconstruct ``qmodel`` (fresh from ``apply_protocol``) in place; see :class:`Reconstructor`.

    The result's record has ``methods["recon"]`` = per-unit statistics (loss at the first and last step, the
    hard-rounded unit's loss on quantized inputs, wall time) and ``n_images``, the number of images it
    trained on (the calibration set, with its augmented copies where ``augment`` asked for them).
    """
    if isinstance(passes, ReconConfig):
        passes = [passes]
    r = Reconstructor(qmodel, images, passes, **kw)
    q = r.run()
    record_of(q).methods["recon"] = {"units": r.stats, "steps_run": r.steps_run, "n_images": int(r.images.shape[0])}
    return q


def quantize_reconstruct(ctx, method: str) -> nn.Module:
    """The registered quantizers ``adaround`` / ``brecq`` / ``qdrop`` / ``genie-m``: lay the model out
    by ``ctx.protocol`` (weights: per-channel L_p search, p = 2.4, as BRECQ/Genie initialise them),
    then reconstruct it on ``ctx.images`` with the method's passes (``ctx.hparams`` override
    :class:`ReconConfig` fields; the others are :class:`ReconEngineConfig`'s)."""
    from ..quant.protocol import apply_protocol

    if ctx.images is None:
        raise BadValueError(f"the {method} quantizer needs calibration images (a synthesizer, --synthetic or --calib)")
    hp = dict(ctx.hparams or {})
    eng = ReconEngineConfig.from_hparams(hp)
    # augmented copies of the calibration set (zsq.data.augment); ``none`` leaves it as it is
    images = augment_set(ctx.images, eng.augment, copies=eng.augment_copies, pad=eng.augment_pad, seed=ctx.seed)
    q = apply_protocol(ctx.model, ctx.protocol, ctx.w_bits, ctx.a_bits, policy=ctx.policy,
                       w_observer=eng.w_observer, a_observer=hp.get("a_observer", ReconConfig.a_observer),
                       strict=ctx.strict)
    passes = method_passes(method, hp, protocol_name=ctx.protocol.name)
    return reconstruct(q, images, passes, seed=ctx.seed, progress=ctx.progress, ckpt_dir=ctx.ckpt_dir,
                       resume=ctx.resume, ckpt_every_s=float(eng.ckpt_every_s),
                       stop_at=tuple(eng.stop_at) if eng.stop_at is not None else None)
