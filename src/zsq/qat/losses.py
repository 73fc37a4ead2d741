"""The loss terms and batch transforms of the QAT methods (:mod:`zsq.qat.engine`'s fixed-set loop and
the generator loop): Hinton KD (:func:`kd_loss`), the augmentation (:func:`random_resized_crop_flip`)
and the method-specific terms below; :mod:`zsq.qat.student` computes them for a batch.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import resample_box_flip


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
