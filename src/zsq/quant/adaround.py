"""AdaRound weight quantization (Nagel et al., ICML 2020) and Genie-M's variant with a learnable step.

A weight ``w`` with per-channel step ``s`` and zero point ``z`` is quantized as

    w_q = s * (clamp(floor(w / s_0) + h(v) + z, qmin, qmax) - z)

where ``floor(w / s_0)`` is computed **once** from the initial step ``s_0`` and kept fixed, and
``h(v) = clamp(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)`` is the rectified sigmoid
(``zeta = 1.1``, ``gamma = -0.1``) of the learnable rounding logits ``v``, initialised so that
``h(v)`` equals the fractional part of ``w / s_0`` (the soft quantizer starts at ``w`` itself).
The regulariser ``sum(1 - |2 h(v) - 1|^beta)`` pushes every ``h`` to 0 or 1; after training the
rounding is hard: ``h = [v >= 0]``.

With ``learn_scale=True`` (or ``"absolute"``) the step ``s`` is an ``nn.Parameter`` learnt jointly
with ``v`` while the floor stays the one of ``s_0`` (Genie-M [code: SamsungLabs/Genie quantizer.py];
methods.md A.3 pitfall 3: the integer grid effectively moves with ``s``). With ``"relative"`` the
learnt parameter is ``u = log(s / s_0)`` (``s = s_0 exp(u)``, ``u`` starts at 0), so an optimizer
step changes every channel's step by the same *fraction* whatever its size: Adam's update has
roughly the size of its learning rate, and an absolute lr of 1e-4 (Genie's) moves an 8-bit step of
3e-4 (EfficientNet-Lite0's depthwise layers) by a third of itself per iteration. With
``learn_scale=False`` the step is fixed (AdaRound / BRECQ / QDrop). :attr:`step_param` is the tensor
that is learnt (``s`` or ``u``), :attr:`scale` always the step itself.

:meth:`AdaRoundQuantizer.bake` turns the result back into zsq's standard structure: a plain
:class:`~zsq.quant.modules.Quantizer` whose ``scale`` is the learnt step and a weight lying on that
grid, so ``Quantizer(weight)`` reproduces the hard-rounded weight exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BadValueError
from .modules import Quantizer

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """``clamp(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def rectified_sigmoid_inverse(h: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """``v`` with ``rectified_sigmoid(v) == h`` for ``h`` in [0, 1) (always inside the linear part)."""
    return -torch.log((zeta - gamma) / (h - gamma) - 1.0)


def round_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's rounding regulariser ``sum(1 - |2h - 1|^beta)`` (0 when every ``h`` is 0 or 1)."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


class AdaRoundQuantizer(nn.Module):
    """Learnable-rounding replacement for a layer's weight quantizer ``wq`` during reconstruction.

    ``soft=True`` uses ``h(v)`` (training), ``soft=False`` the hard rounding ``v >= 0``.
    Construct with :meth:`from_quantizer`; call like a Quantizer: ``aq(weight)`` (the weight
    argument is only used for its shape/dtype: the floor is fixed at construction).
    """

    SCALE_MODES = ("fixed", "absolute", "relative")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 learn_scale: bool | str = False, ch_axis: int = 0):
        super().__init__()
        shape = [1] * weight.dim()
        shape[ch_axis] = -1
        if scale.numel() == 1:
            shape = [1] * weight.dim()
        s0 = scale.detach().float().reshape(shape).clone()
        mode = ("absolute" if learn_scale else "fixed") if isinstance(learn_scale, bool) else str(learn_scale)
        if mode not in self.SCALE_MODES:
            raise BadValueError(f"weight step learning must be one of {', '.join(self.SCALE_MODES)}, got '{mode}'")
        self.qmin, self.qmax, self.scale_mode = int(qmin), int(qmax), mode
        self.soft = True
        w = weight.detach().float()
        floor = torch.floor(w / s0)
        self.register_buffer("floor", floor)
        self.register_buffer("zero_point", zero_point.detach().float().reshape(shape).clone())
        if mode == "absolute":
            self.step = nn.Parameter(s0)
        elif mode == "relative":
            self.register_buffer("step", s0)
            self.log_ratio = nn.Parameter(torch.zeros_like(s0))
        else:
            self.register_buffer("step", s0)
        frac = (w / s0 - floor).clamp(0.0, 1.0 - 1e-6)
        self.v = nn.Parameter(rectified_sigmoid_inverse(frac))

    @classmethod
    def from_quantizer(cls, q: Quantizer, weight: torch.Tensor, learn_scale: bool | str = False) -> "AdaRoundQuantizer":
        return cls(weight, q.scale, q.zero_point, q.qmin, q.qmax, learn_scale=learn_scale,
                   ch_axis=q.ch_axis if q.per_channel else 0)

    @property
    def learn_scale(self) -> bool:
        return self.scale_mode != "fixed"

    @property
    def scale(self) -> torch.Tensor:
        """The weight step ``s`` (``s_0 exp(u)`` in ``relative`` mode)."""
        return self.step * torch.exp(self.log_ratio) if self.scale_mode == "relative" else self.step

    @property
    def step_param(self) -> torch.Tensor:
        """What reconstruction learns and checkpoints: ``u`` (relative), else the step tensor itself."""
        return self.log_ratio if self.scale_mode == "relative" else self.step

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v) if self.soft else (self.v >= 0).to(self.v.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        return round_regularizer(rectified_sigmoid(self.v), beta)

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        q = torch.clamp(self.floor + self.h() + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        soft, self.soft = self.soft, False
        try:
            return self.forward().detach().clone()
        finally:
            self.soft = soft

    @torch.no_grad()
    def bake(self, layer: nn.Module, wq: Quantizer) -> None:
        """Write the hard-rounded weight into ``layer.weight`` and the (learnt) step into ``wq.scale``.

        Afterwards ``wq(layer.weight)`` equals :meth:`hard_weight` exactly (tested).
        """
        w = self.hard_weight()
        layer.weight.data.copy_(w.to(layer.weight.dtype))
        s = self.scale.detach().reshape(-1)
        if isinstance(wq.scale, nn.Parameter):
            wq.scale.data.copy_(s.reshape(wq.scale.shape))
        else:
            wq.scale = s.clone().reshape(wq.scale.shape)
