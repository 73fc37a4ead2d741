"""The student side of one QAT step (:class:`StudentLosses`, a base of
:class:`zsq.qat.engine.QATTrainer`): the hooks the loss terms read, the teacher / student forward pair,
the weighted loss terms of :mod:`zsq.qat.losses` on a batch, PLF's reliability filter, and the fused
activation fake-quantization the training steps run under."""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hardware import Amp
from ..quant.modules import Quantizer
from .losses import _Recorder, grad_cam, kd_loss, masked_ce, normalized_entropy


class _Pass(NamedTuple):
    """Teacher and student logits of one forward pair and what the hooks recorded."""

    t: Tensor
    s: Tensor
    fa_t: list[Tensor]
    fa_s: list[Tensor]
    cam_t: list[Tensor]
    cam_s: list[Tensor]


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


class StudentLosses:
    """The loss side of :class:`~zsq.qat.engine.QATTrainer` (its attributes: ``cfg``, ``q`` the student,
    ``teacher``, ``images`` / ``labels``, ``device``, ``aqs``, ``bns``, ``fa`` / ``cam`` recorder pairs,
    ``reliable``; its ``_ema_hook``)."""

    @functools.cached_property
    def amp(self) -> Amp:
        """The student's mixed precision (:class:`zsq.hardware.Amp`): bf16 / fp32 autocast, fp16 with loss
        scaling on a CUDA device without bf16 (``_update`` backpropagates and steps through it)."""
        return Amp(self.cfg.precision, self.device)

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return self.amp.autocast()
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
