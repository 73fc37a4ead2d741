"""Data-free activation statistics and ranges from BatchNorm statistics.

The synthesis-free recipes (DFQ, SQuant, UDFC) never see an image. What they know about an
activation tensor comes from the BatchNorm layers: a BN output channel has mean ``beta`` and
standard deviation ``|gamma|`` over the training data, so a ReLU fed by a BN sees the
pre-activation ``N(beta, gamma^2)`` (DFQ's Gaussian assumption, Nagel et al. 2019, section 4.2).

Tensors that are not a BN output (a residual sum ``bn2(conv2(x)) + shortcut``, a pooled feature)
get their moments from one **BN-consistent forward**: Gaussian noise through a copy of the FP model
whose BatchNorms normalise with the statistics of the batch itself, so every BN output has exactly
mean ``beta`` and standard deviation ``|gamma|`` per channel, and every other tensor (sums,
paddings, poolings, activations) is what the real network computes from such BN outputs. No data,
no learning; one forward pass of ``n`` noise images (32 at 32x32, 8 at 224x224).

Ranges (:func:`set_act_ranges`), per activation quantizer, from the pre-activation moments
``(mu_c, sigma_c)`` of every channel ``c`` of the quantized tensor:

* after ReLU: ``[0, max_c(mu_c + k sigma_c)]`` (clipped at zero, the ReLU's lower bound);
* after ReLU6: the same, capped at 6; LeakyReLU: ``slope * min_c(mu_c - k sigma_c)`` below zero;
* any other tensor (block outputs without activation, SiLU, ...): ``[min_c(m_c - k s_c), max_c(m_c + k s_c)]``
  from the tensor's own moments.

``k`` depends on the quantizer's bit width (:data:`DEFAULT_K`). The values were picked by hand when
this module was written, from a sweep on 5,000 class-balanced CIFAR-10 *training* images whose script
and per-run results were not committed. The record is its rerun, ``bench/range_validation.py``
(one JSON per run in ``bench/runs/range-val/``): ResNet-20, the ``squant`` recipe, the ``fixed``
protocol, seed 0, one ``k`` for every activation quantizer, top-1 on the validation split of
``bench/valsplit.py`` (the first 500 images per class of ``cifar10-jpeg/train.tar``, never the test
set; FP 85.96):

* 8 bits (W8A8): k = 4: 85.68, 6: 85.90, 8: 85.80, 10: 85.76, 14: 85.54 -> 8, the middle of the
  6-10 plateau (k = 6 is 0.10 higher, 5 images of 5,000);
* 4 bits (W4A4): k = 3.0: 82.58, 3.5: 82.88, 4.0: 83.28, 4.5: 83.08, 5.0: 82.86 -> 4;
* 3 bits (W3A3): k = 2.5: 73.62, 3.0: 75.44, 3.5: 73.88, 4.0: 72.14 -> 3.

The criterion is top-1. At 3 and 4 bits the smallest k of the sweep has the highest agreement with the
FP model and the lowest KL(FP, q) on the same split (also in the records; 4 bits: k = 3 agrees on 91.08%
against k = 4's 89.60%; 3 bits: k = 2.5, 79.84% against 79.54%): the criteria disagree, and these
defaults follow the labels.

5-7 bits are interpolated (k = bits) and 2 bits extrapolated (2.5), not tuned. Wider ranges cost
resolution, narrower ones clip: the best ``k`` falls with the bit width.

``act_range="mse"`` instead picks, per quantizer, the clipping range minimising the expected
squared quantization error under that same per-channel Gaussian model (samples drawn from the
model, fixed seed; zsq's L_p search with p = 2): no ``k`` at all.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedLayerError
from ..quant.graph import WEIGHT_LAYERS, trace
from ..quant.modules import Quantizer
from ..record import model_info, record_of

# k (range = mean + k * std of the pre-activation) per activation bit width: 3, 4 and 8 bits picked on a
# train.tar split, on record in bench/runs/range-val/ (see the module docstring), the rest not tuned;
# bit widths in between use the nearest lower entry.
DEFAULT_K: dict[int, float] = {2: 2.5, 3: 3.0, 4: 4.0, 5: 5.0, 6: 6.0, 7: 7.0, 8: 8.0, 16: 12.0}

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


class NoBatchNormError(UnsupportedLayerError):
    """A synthesis-free recipe needs BatchNorm statistics the model does not have."""


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) and m.running_mean is not None for m in model.modules())


def require_batchnorm(model: nn.Module, what: str) -> None:
    if not has_batchnorm(model):
        raise NoBatchNormError(
            f"{what} needs BatchNorm statistics and the model has no BatchNorm layer: use a synthesizer "
            f"(e.g. --recipe zeroq) or real calibration images (--calib PATH)")


def k_for_bits(bits: int, table: dict | None = None) -> float:
    table = {int(b): float(v) for b, v in (table or DEFAULT_K).items()}
    below = [b for b in table if b <= bits]
    return table[max(below)] if below else table[min(table)]


def act_kind(m: nn.Module) -> str:
    if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == 6.0):
        return "relu6"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.LeakyReLU):
        return "leaky"
    return "none"


@dataclass
class Moments:
    """Per-channel mean and standard deviation of one tensor (channel = dim 1)."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class TensorModel:
    """What is known of one tensor: its own moments and, after an activation, the activation kind
    and its input (pre-activation) moments. Gaussian pre-activation assumed."""

    out: Moments
    act: str = "none"  # relu | relu6 | leaky | none
    pre: Moments | None = None
    slope: float = 0.0  # LeakyReLU negative slope

    def bounds(self) -> tuple[float, float]:
        """The activation's own output bounds (lower, upper)."""
        return {"relu": (0.0, math.inf), "relu6": (0.0, 6.0)}.get(self.act, (-math.inf, math.inf))


@dataclass
class BNStats:
    """Moments of every module output and every Conv/Linear input of an FP (unfolded) model."""

    modules: dict[str, TensorModel] = field(default_factory=dict)
    layer_inputs: dict[str, Moments] = field(default_factory=dict)
    input_producer: dict[str, str | None] = field(default_factory=dict)  # layer -> module producing its input
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # kept noise-forward inputs (keep_inputs)
    bn_after: dict[str, str] = field(default_factory=dict)  # layer -> the BatchNorm reading its output alone

    def for_site(self, owner: str) -> TensorModel:
        return self.modules[owner]

    def layer_input_model(self, layer: str) -> TensorModel:
        """The model of ``layer``'s input tensor: the producing activation's when the input comes
        straight from an activation module, else the measured moments (Gaussian)."""
        prod = self.input_producer.get(layer)
        if prod is not None and prod in self.modules:
            tm = self.modules[prod]
            if tm.act != "none":
                return tm
        return TensorModel(self.layer_inputs[layer])


def _moments(x: torch.Tensor) -> Moments:
    x = x.detach().float()
    if x.dim() == 1:
        x = x[:, None]
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    return Moments(mean, var.clamp_min(0).sqrt())


def example_shape(model: nn.Module) -> int:
    info = model_info(model)
    return info.preprocess.input_size if info is not None else 32


@torch.no_grad()
def collect_stats(model: nn.Module, n: int | None = None, seed: int = 0, what: str = "this recipe",
                  keep_inputs: set[str] | None = None, keep_numel: int = 1 << 21) -> BNStats:
    """One BN-consistent forward of Gaussian noise through a copy of ``model`` (see module doc).
    ``keep_inputs``: Conv/Linear layers whose input samples are kept (the first images, at most
    ``keep_numel`` values each) for estimators that need more than moments (UDFC)."""
    require_batchnorm(model, what)
    size = example_shape(model)
    if n is None:
        n = 32 if size <= 64 else 8
    m = copy.deepcopy(model).eval()
    for b in m.modules():
        if getattr(b, "inplace", False) is True:
            b.inplace = False
    for b in m.modules():
        if isinstance(b, _BN):
            b.running_mean, b.running_var, b.track_running_stats = None, None, False
    stats = BNStats()
    device = next((p.device for p in m.parameters()), torch.device("cpu"))
    tr = trace(m, torch.zeros(2, 3, size, size, device=device))  # batch 2: BN without running stats needs > 1 value per channel
    for c in tr.calls:
        if isinstance(c.module, WEIGHT_LAYERS) and c.inputs:
            p = tr.producer.get(c.inputs[0])
            stats.input_producer.setdefault(c.name, p.name if p is not None else None)
    stats.bn_after = bn_after_layers(tr)
    del tr
    handles = []

    def hook(name):
        def fn(mod, args, out):
            if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                return
            if name in stats.modules:  # a module called twice keeps its first call
                return
            kind = act_kind(mod)
            pre = _moments(args[0]) if kind != "none" else None
            stats.modules[name] = TensorModel(_moments(out), kind, pre,
                                              float(getattr(mod, "negative_slope", 0.0)))
            if isinstance(mod, WEIGHT_LAYERS):
                stats.layer_inputs[name] = _moments(args[0])
                if keep_inputs and name in keep_inputs:
                    x = args[0].detach()
                    per = max(1, x[0].numel())
                    stats.inputs[name] = x[: max(1, keep_numel // per)].clone()

        return fn

    for name, mod in m.named_modules():
        if name:  # leaves and blocks (a block's output may be a quantized tensor without activation)
            handles.append(mod.register_forward_hook(hook(name)))
    g = torch.Generator().manual_seed(seed)
    try:
        m(torch.randn(n, 3, size, size, generator=g).to(device))  # drawn on the CPU: the same noise everywhere
    finally:
        for h in handles:
            h.remove()
    return stats


def bn_after_layers(tr) -> dict[str, str]:
    """``{layer: bn}`` for every Conv/Linear whose output is read by one BatchNorm and nothing else."""
    out = {}
    for c in tr.calls:
        if isinstance(c.module, WEIGHT_LAYERS) and c.output is not None:
            cons = tr.consumers(c.output)
            if len(cons) == 1 and isinstance(cons[0].module, _BN):
                out.setdefault(c.name, cons[0].name)
    return out


# -- closed forms for a Gaussian through a (clipped) activation -----------------------------------

_SQRT2 = math.sqrt(2.0)


def _pdf(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x):
    return 0.5 * (1 + torch.erf(x / _SQRT2))


def clipped_normal_mean(mu: torch.Tensor, sigma: torch.Tensor, lo: float | torch.Tensor = 0.0,
                        hi: float | torch.Tensor = math.inf) -> torch.Tensor:
    """``E[clip(z, lo, hi)]`` for ``z ~ N(mu, sigma^2)``; ``lo = 0, hi = inf`` is DFQ's ReLU formula
    ``sigma phi(mu/sigma) + mu Phi(mu/sigma)``."""
    sigma = sigma.clamp_min(1e-12)
    lo_t = torch.as_tensor(lo, dtype=mu.dtype, device=mu.device).expand_as(mu)
    hi_t = torch.as_tensor(hi, dtype=mu.dtype, device=mu.device).expand_as(mu)
    a = (lo_t - mu) / sigma
    b = (hi_t - mu) / sigma
    Fa = torch.where(torch.isinf(a), (a > 0).to(mu.dtype), _cdf(a))
    Fb = torch.where(torch.isinf(b), (b > 0).to(mu.dtype), _cdf(b))
    fa = torch.where(torch.isinf(a), torch.zeros_like(a), _pdf(a))
    fb = torch.where(torch.isinf(b), torch.zeros_like(b), _pdf(b))
    lo_term = torch.where(torch.isinf(lo_t), torch.zeros_like(mu), lo_t * Fa)
    hi_term = torch.where(torch.isinf(hi_t), torch.zeros_like(mu), hi_t * (1 - Fb))
    return lo_term + hi_term + mu * (Fb - Fa) + sigma * (fa - fb)


def expected_value(tm: TensorModel, lo: float = -math.inf, hi: float = math.inf) -> torch.Tensor:
    """Per-channel ``E[clip(x, lo, hi)]`` of a tensor described by ``tm`` (``lo/hi``: e.g. the
    range of the quantizer that reads it; infinite = no clipping)."""
    if tm.pre is not None and tm.act in ("relu", "relu6"):
        a_lo, a_hi = tm.bounds()
        return clipped_normal_mean(tm.pre.mean, tm.pre.std, max(lo, a_lo), min(hi, a_hi))
    if tm.pre is not None and tm.act == "leaky":
        pos = clipped_normal_mean(tm.pre.mean, tm.pre.std, 0.0, hi)
        neg = clipped_normal_mean(tm.pre.mean, tm.pre.std, -math.inf, 0.0)
        return pos + (tm.slope * neg).clamp_min(lo)  # the negative part scaled by the slope (clip approx.)
    if math.isinf(lo) and math.isinf(hi):
        return tm.out.mean.clone()
    return clipped_normal_mean(tm.out.mean, tm.out.std, lo, hi)


def tensor_range(tm: TensorModel, k: float) -> tuple[float, float]:
    """``mean +- k std`` of the pre-activation, through the activation (see module doc)."""
    if tm.pre is not None and tm.act in ("relu", "relu6", "leaky"):
        top = float((tm.pre.mean + k * tm.pre.std).max())
        bot = float((tm.pre.mean - k * tm.pre.std).min())
        a_lo, a_hi = tm.bounds()
        if tm.act == "leaky":
            return min(0.0, tm.slope * bot), max(top, 0.0)
        return a_lo, max(min(top, a_hi), 1e-8)
    top = float((tm.out.mean + k * tm.out.std).max())
    bot = float((tm.out.mean - k * tm.out.std).min())
    return min(bot, 0.0), max(top, 0.0)


def sample_model(tm: TensorModel, n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Samples ``[C, n]`` of the tensor under its per-channel Gaussian model (fixed seed)."""
    src = tm.pre if tm.pre is not None and tm.act != "none" else tm.out
    g = torch.Generator().manual_seed(seed)
    z = src.mean[:, None] + src.std[:, None] * torch.randn(src.mean.numel(), n, generator=g).to(src.mean.device)
    if tm.act == "relu" and tm.pre is not None:
        return z.clamp_min(0)
    if tm.act == "relu6" and tm.pre is not None:
        return z.clamp(0, 6)
    if tm.act == "leaky" and tm.pre is not None:
        return torch.where(z >= 0, z, tm.slope * z)
    return z


def mse_range(tm: TensorModel, bits: int, n: int = 4096, seed: int = 0) -> tuple[float, float]:
    """The per-tensor range minimising the expected squared quantization error of samples drawn from
    the per-channel Gaussian model (zsq's L_p clipping search with p = 2)."""
    from ..quant.observers import lp_search

    x = sample_model(tm, n, seed).reshape(1, -1)
    signed = bool((x < 0).any())
    lo, hi = lp_search(x, bits, symmetric=False, signed=signed, p=2.0)
    return float(lo.min()), float(hi.max())


# -- activation quantizers of a quantized model ---------------------------------------------------

def act_sites(qmodel: nn.Module) -> list[tuple[str, str, str, Quantizer]]:
    """``(quantizer name, owner name, where, quantizer)`` of every activation quantizer of a model
    laid out by :func:`~zsq.quant.protocol.apply_protocol` (``where``: out | in)."""
    out = []
    for site in record_of(qmodel).layout.acts:
        q = qmodel.get_submodule(site.name)
        owner = site.name.rsplit(".", 1)[0]
        out.append((site.name, owner, site.where, q))
    return out


def site_model(stats: BNStats, owner: str, where: str) -> TensorModel:
    if where == "out":
        if owner not in stats.modules:
            raise KeyError(f"no statistics for {owner}: was the model changed after collect_stats?")
        return stats.modules[owner]
    return stats.layer_input_model(owner)


def set_act_ranges(qmodel: nn.Module, stats: BNStats, k: dict | float | None = None, mode: str = "ksigma",
                   seed: int = 0) -> dict[str, tuple[float, float]]:
    """Set every activation quantizer's range from ``stats`` (mode ``ksigma`` or ``mse``); returns
    ``{quantizer name: (lo, hi)}``. ``k``: a number, or a table bits -> k (default :data:`DEFAULT_K`)."""
    if mode not in ("ksigma", "mse"):
        raise ValueError(f"act_range must be ksigma or mse, got {mode}")
    ranges = {}
    for name, owner, where, q in act_sites(qmodel):
        tm = site_model(stats, owner, where)
        if mode == "mse":
            lo, hi = mse_range(tm, q.bits, seed=seed)
        else:
            kk = float(k) if isinstance(k, (int, float)) else k_for_bits(q.bits, k)
            lo, hi = tensor_range(tm, kk)
        q.set_range(torch.tensor([lo], device=q.scale.device), torch.tensor([hi], device=q.scale.device))
        q.observer = None
        q.mode = "quant"
        ranges[name] = (lo, hi)
    return ranges


def quantizer_bounds(q: Quantizer) -> tuple[float, float]:
    """The real-valued interval a (per-tensor) quantizer represents."""
    s, z = float(q.scale.reshape(-1)[0]), float(q.zero_point.reshape(-1)[0])
    return (q.qmin - z) * s, (q.qmax - z) * s
