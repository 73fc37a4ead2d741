"""Quantizer modules and the quantized Conv2d / Linear layers.

A :class:`Quantizer` fake-quantizes a tensor with per-tensor or per-channel (scale, zero_point).
Its ``mode`` is ``"quant"`` (fake-quantize), ``"observe"`` (pass through, collect the range) or
``"off"`` (pass through). ``make_learnable()`` turns the step into an LSQ parameter.
``drop_prob`` (QDrop, Wei et al. 2022): in training mode only, each element keeps its FP value with
this probability instead of being quantized (default 0: no effect; eval mode is never affected).
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from ..ops import MatMul
from .fake import fake_quant, grad_scale, qparams_from_range, quantize_int
from .observers import Observer, weight_range


class Quantizer(nn.Module):
    def __init__(self, bits: int = 8, *, symmetric: bool = False, per_channel: bool = False, ch_axis: int = 0,
                 observer: str = "minmax", channels: int = 1):
        super().__init__()
        self.bits, self.symmetric, self.per_channel, self.ch_axis = bits, symmetric, per_channel, ch_axis
        self.observer_kind = observer
        self.signed = False
        self.qmin, self.qmax = 0, 2**bits - 1
        self.mode = "quant"
        self.lsq_grad_scale = False  # LSQ gradient scaling 1/sqrt(N * qmax); Genie/BRECQ do not use it
        self.drop_prob = 0.0  # QDrop: probability of passing an element through unquantized (train mode only)
        n = channels if per_channel else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n))
        self.observer: Observer | None = None
        self.initialized = False

    # -- configuration carried in the state dict (weights_only-safe plain types) -------------------
    def get_extra_state(self):
        return {"bits": self.bits, "symmetric": self.symmetric, "per_channel": self.per_channel,
                "ch_axis": self.ch_axis, "signed": self.signed, "qmin": self.qmin, "qmax": self.qmax,
                "mode": self.mode, "initialized": self.initialized}

    def set_extra_state(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def extra_repr(self) -> str:
        g = f"per_channel(axis={self.ch_axis})" if self.per_channel else "per_tensor"
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, {g}, mode={self.mode}"

    # -- ranges ------------------------------------------------------------------------------------
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if getattr(self, "fixed_range", None) is not None:  # a range known without data (deploy's network input)
            lo, hi = (torch.full_like(lo, float(self.fixed_range[0])), torch.full_like(hi, float(self.fixed_range[1])))
        self.signed = bool((lo < 0).any())
        scale, zp, self.qmin, self.qmax = qparams_from_range(lo.reshape(-1), hi.reshape(-1), self.bits,
                                                              self.symmetric, self.signed)
        with torch.no_grad():
            if isinstance(self.scale, nn.Parameter):
                self.scale.data.copy_(scale.reshape(self.scale.shape))
            else:
                self.scale = scale.reshape(-1).clone()
            self.zero_point = zp.reshape(-1).clone()
        self.initialized = True

    def init_from_tensor(self, x: torch.Tensor, observer: str | None = None) -> None:
        """Set the range from one tensor (weights): min-max, percentile or L_p search."""
        lo, hi = weight_range(x, observer or self.observer_kind, self.bits, self.per_channel, self.symmetric,
                              self.ch_axis)
        self.set_range(lo, hi)

    def start_observing(self, kind: str | None = None) -> None:
        self.observer = Observer(kind or self.observer_kind, self.per_channel, self.ch_axis)
        self.mode = "observe"

    def finish_observing(self) -> None:
        if self.observer is None or self.observer.lo is None:
            raise RuntimeError("quantizer observed no data: was the calibration forward run?")
        lo, hi = self.observer.range(self.bits, self.symmetric, signed=bool((self.observer.lo < 0).any()))
        self.set_range(lo, hi)
        self.observer = None
        self.mode = "quant"

    def make_learnable(self) -> nn.Parameter:
        """Turn the step size into an LSQ parameter (zero point stays fixed)."""
        if not isinstance(self.scale, nn.Parameter):
            s = self.scale
            del self.scale
            self.scale = nn.Parameter(s.clone())
        return self.scale

    def _shape(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.ch_axis] = -1
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if self.observer is None:
                self.start_observing()
            self.observer.update(x)
            return x
        s = self.scale
        dropping = self.training and self.drop_prob > 0.0
        if (not dropping and not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad))
                and x.dtype == torch.float32):
            # no gradient needed: torch's fused kernel (same integer grid, one pass over memory)
            zp = self.zero_point.round().to(torch.int32)
            if self.per_channel:
                return torch.fake_quantize_per_channel_affine(x, s.detach().float(), zp, self.ch_axis,
                                                              self.qmin, self.qmax)
            return torch.fake_quantize_per_tensor_affine(x, s.detach().reshape(()).float(), zp.reshape(()),
                                                         self.qmin, self.qmax)
        if self.lsq_grad_scale and isinstance(s, nn.Parameter):
            s = grad_scale(s, 1.0 / math.sqrt(x.numel() / s.numel() * self.qmax))
        out = fake_quant(x, self._shape(x, s), self._shape(x, self.zero_point), self.qmin, self.qmax)
        if dropping:
            out = torch.where(torch.rand_like(x) < self.drop_prob, x, out)
        return out

    @torch.no_grad()
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_int(x, self._shape(x, self.scale), self._shape(x, self.zero_point), self.qmin, self.qmax)


def weight_codes(wq: Quantizer, w: torch.Tensor) -> torch.Tensor:
    """The integer codes of the weights the model computes with: read back from the quantizer's own
    output, so ``(codes - z) * s`` equals ``wq(w)`` whichever rounding its forward uses
    (``round(w / s + z)`` with autograd, torch's fused ``round(w * (1 / s)) + z`` without; they
    differ by one step on .5 ties, and so may ``Quantizer.int_repr``). Float tensors holding
    integers; ``zsq.save`` (``int_weights``) and the ONNX export store them."""
    with torch.no_grad():
        s, z = wq._shape(w, wq.scale.detach()), wq._shape(w, wq.zero_point)
        fq = wq(w) if wq.mode == "quant" else w
        return torch.clamp(torch.round(fq / s) + z, wq.qmin, wq.qmax)


class QuantLayerMixin:
    """Shared by QuantConv2d / QuantLinear: a weight quantizer ``wq`` and an optional input quantizer."""

    wq: nn.Module
    aq_in: nn.Module | None

    def _setup(self, w_bits: int, w_observer: str, per_channel: bool, symmetric: bool):
        self.wq = Quantizer(w_bits, symmetric=symmetric, per_channel=per_channel, ch_axis=0,
                            observer=w_observer, channels=self.weight.shape[0]).to(self.weight.device)
        self.wq.init_from_tensor(self.weight.detach())
        self.aq_in = None

    def qweight(self) -> torch.Tensor:
        return self.wq(self.weight)

    def _qin(self, x):
        return self.aq_in(x) if self.aq_in is not None else x


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d, w_bits: int, w_observer: str = "minmax", per_channel: bool = True,
                   symmetric: bool = False) -> "QuantConv2d":
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
        q.weight = m.weight
        q.bias = m.bias
        q._setup(w_bits, w_observer, per_channel, symmetric)
        return q

    def forward(self, x):
        return self._conv_forward(self._qin(x), self.qweight(), self.bias)


class QuantLinear(QuantLayerMixin, nn.Linear):
    @classmethod
    def from_float(cls, m: nn.Linear, w_bits: int, w_observer: str = "minmax", per_channel: bool = True,
                   symmetric: bool = False) -> "QuantLinear":
        q = cls(m.in_features, m.out_features, m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        q.weight = m.weight
        q.bias = m.bias
        q._setup(w_bits, w_observer, per_channel, symmetric)
        return q

    def forward(self, x):
        return F.linear(self._qin(x), self.qweight(), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


class QuantMatMul(MatMul):
    """``a @ b`` between two activations (a ViT's ``q @ k^T`` and ``attn @ v``) with one activation
    quantizer per operand, ``aq_a`` and ``aq_b`` (PTQ4ViT / FQ-ViT's quantized matmul)."""

    def __init__(self, aq_a: Quantizer, aq_b: Quantizer):
        super().__init__()
        self.aq_a, self.aq_b = aq_a, aq_b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.aq_a(a), self.aq_b(b))


def quantizers(model: nn.Module, kind: str = "all"):
    """Yield ``(name, Quantizer)``: ``kind`` = all | weight | act."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            is_w = name.endswith(".wq") or name == "wq"
            if kind == "all" or (kind == "weight") == is_w:
                yield name, m
