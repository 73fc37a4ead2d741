"""UDFC: Unified Data-Free Compression: Pruning and Quantization without Fine-Tuning (Bai et al., ICCV 2023),
quantization part.

UDFC's premise: the information a compressed (here: quantized) channel loses can partly be
restored through the **next** layer, by rescaling the weights that read the damaged channel, with
the coefficients obtained in closed form by minimising the next layer's expected reconstruction
error under statistics derived from BatchNorm. The authors' code is not available and the paper's
exact closed form is marked unverified in methods.md; this is our derivation of that idea, stated
fully so that it can be checked:

For a pair ``A -> BN -> act -> B`` (the CLE pairs of :func:`zsq.ptq.dfq.find_pairs`), channel ``i``
of ``A`` has the FP pre-activation ``z_i ~ N(beta_i, gamma_i^2)`` (BN statistics, captured before
folding). Quantizing ``A``'s weights turns it into ``z_i + e_i`` with ``e_i = dW_i * x`` and
``E[e_i] = 0`` after bias correction. The scale-free second moments, the correlation
``rho_i = corr(e_i, z_i)`` and the ratio ``r_i = Var(e_i) / Var(z_i)``, are measured by applying
``W`` and ``dW`` to ``A``'s input in the BN-consistent noise forward (:mod:`zsq.ptq.bn_ranges`;
``cov="noise"``, default) and then scaled to the BN variance: ``Var(e_i) = r_i gamma_i^2``,
``Cov = rho_i sqrt(r_i) gamma_i^2``. (``cov="independent"`` assumes independent input values
instead: ``Var(e_i) = sum_jk dW_ijk^2 Var(x_j)``, ``Cov = sum_jk dW_ijk W_ijk Var(x_j)``; on
ResNet-20 that underestimates ``|rho|`` several-fold against real data, where the noise forward
comes close. The correlation is what makes a quantized channel a *scaled* copy of the FP one,
the part UDFC's rescaling can undo.) ``act_noise=True`` adds the input quantizer's rounding noise
``sum_jk Wq_ijk^2 D_in^2/12`` to ``Var(e_i)``. ``B`` then reads ``a~_i = Q(act(z_i + e_i))`` instead of
``a_i = act(z_i)``: clipped to the range of the activation quantizer (``clip=True``) and, with
``out_noise=True``, rounded (noise ``D^2/12``).
Replacing ``B``'s column ``i`` by ``s_i`` times itself and adding ``t_i`` to that input
(folded into ``B``'s bias) minimises ``E[(a_i - s_i a~_i - t_i)^2]``, whose diagonal sum bounds the
reconstruction error of ``B``'s output, at

    s_i = Cov(a_i, a~_i) / Var(a~_i),    t_i = E[a_i] - s_i E[a~_i],

with every expectation over the bivariate Gaussian ``(z_i, e_i)`` by Gauss-Hermite quadrature.
``s_i`` shrinks channels whose quantization noise is large against their signal (a Wiener gain)
and grows channels that the activation range clips; ``t_i`` removes the mean shift. ``fit="gain"``
instead undoes only the linear gain of ``a~`` on ``a`` (``s_i = Var(a_i) / Cov(a_i, a~_i)``, no
shrinkage). Layers are processed in network order: ``A`` is quantized and bias-corrected, its error
compensated into ``B``'s FP weights, then ``B`` is quantized from those compensated weights, and so on.

Measured (ResNet-20, `fixed`, 5,000-image validation split of train.tar, FP 86.40): the predicted
``s`` track the least-squares optimum measured on real activations in direction (both mostly
below 1; correlation 0.1-0.5 across channels), but the rescaling lowers accuracy: W3A8 80.70 with
``s`` and ``t``, 83.66 with ``t`` only, 83.94 with neither (= DFQ's bias correction); ``fit="gain"``
is no better. Shrinking the residual branches of a ResNet lowers the output MSE of ``B`` and still
costs accuracy. The recipe keeps the paper's formulation (least squares); report it as such.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..quant.modules import QUANT_LAYERS
from ..record import record_of
from .bn_ranges import BNStats, quantizer_bounds
from .dfq import (Pair, _groups, add_output_shift_, channel_matvec, correct_layer_bias, following_bn,
                  input_expectations, layer_input_quantizer, scale_cols_)
from .squant import squant_layer_

_NODES = 48
#: ``udfc_cov`` (how the error covaries with the input) and ``udfc_fit`` (the gain fit) values (module doc)
COV_MODES = ("noise", "independent")
FITS = ("mse", "gain")


def _gh(n: int = _NODES) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(x, dtype=torch.float64), torch.tensor(w / math.sqrt(2 * math.pi), dtype=torch.float64)


def _act(x: torch.Tensor, kind: str, slope: float = 0.0) -> torch.Tensor:
    if kind == "relu":
        return x.clamp_min(0)
    if kind == "relu6":
        return x.clamp(0, 6)
    if kind == "leaky":
        return torch.where(x >= 0, x, slope * x)
    return x


def compensation(mu: torch.Tensor, sigma: torch.Tensor, var_e: torch.Tensor, cov_ze: torch.Tensor, kind: str,
                 lo: float, hi: float, step: float, slope: float = 0.0, s_limits=(0.5, 2.0), fit: str = "mse"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel ``(s, t, E[a~])`` for FP ``z ~ N(mu, sigma^2)`` and error ``e`` with variance
    ``var_e`` and covariance ``cov_ze`` with ``z`` (see module doc)."""
    x, w = (t.to(mu.device) for t in _gh())
    mu, sigma = mu.double()[:, None, None], sigma.double().clamp_min(1e-12)[:, None, None]
    sd_e = var_e.double().clamp_min(0).sqrt()[:, None, None]
    rho = (cov_ze.double()[:, None, None] / (sigma * sd_e).clamp_min(1e-30)).clamp(-0.99, 0.99)
    u1, u2 = x[None, :, None], x[None, None, :]
    ww = (w[:, None] * w[None, :])[None]
    z = mu + sigma * u1
    e = sd_e * (rho * u1 + torch.sqrt(1 - rho * rho) * u2)
    a = _act(z, kind, slope).expand_as(e)
    at = _act(z + e, kind, slope).clamp(lo, hi)
    ea, eat = (ww * a).sum((1, 2)), (ww * at).sum((1, 2))
    cov = (ww * a * at).sum((1, 2)) - ea * eat
    var = (ww * at * at).sum((1, 2)) - eat * eat + step * step / 12.0
    if fit == "gain":  # undo the gain of a~ on a only (no shrinkage towards the mean)
        var_a = (ww * a * a).sum((1, 2)) - ea * ea
        s = torch.where(cov.abs() > 1e-20, var_a / cov.abs().clamp_min(1e-30), torch.ones_like(var))
    else:
        s = torch.where(var > 1e-20, cov / var.clamp_min(1e-30), torch.ones_like(var))
    s = s.clamp(*s_limits)
    t = ea - s * eat
    return s.float(), t.float(), eat.float()


@torch.no_grad()
def _quantize_layer(m: nn.Module, rounding: str, reinit: bool) -> None:
    if reinit:
        m.wq.init_from_tensor(m.weight.detach())
    if rounding != "nearest" and m.wq.bits <= 8:
        squant_layer_(m, rounding)


@torch.no_grad()
def udfc_quantize_(qmodel: nn.Module, stats: BNStats, pairs: list[Pair], *, rounding: str = "nearest",
                   act_aware: bool = True, act_noise: bool = False, out_noise: bool = False, clip: bool = True,
                   bias_correction: bool = True, cov: str = "noise", fit: str = "mse") -> dict:
    """Quantize the weights of ``qmodel`` layer by layer with UDFC compensation (module doc).
    ``qmodel`` comes from :func:`~zsq.quant.protocol.apply_protocol` with its activation ranges set;
    weights are still FP. Returns a summary (mean |s - 1| per compensated pair)."""
    layers = [n for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)]
    order = {n: i for i, n in enumerate(record_of(qmodel).layout.weights)}
    layers.sort(key=lambda n: order.get(n, len(order)))
    by_a = {}
    for p in pairs:
        if p.bn is None or p.act is None or p.a not in order or p.b not in order:
            continue
        by_a[p.a] = p
    overrides: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    compensated: set[str] = set()
    summary = {}
    for name in layers:
        m = qmodel.get_submodule(name)
        w_ref = m.weight.detach().clone()
        _quantize_layer(m, rounding, reinit=name in compensated)
        if bias_correction:
            ex = overrides.get(name) or input_expectations(qmodel, stats, name, act_aware)
            if ex is not None:
                correct_layer_bias(m, w_ref, ex[0], ex[1], following_bn(qmodel, stats, name))
        p = by_a.get(name)
        if p is None:
            continue
        s, t, eat = _compensate(qmodel, stats, p, w_ref, act_noise, out_noise, clip, cov, fit)
        b = qmodel.get_submodule(p.b)
        shift = channel_matvec(b.weight.detach(), t, _groups(b))
        scale_cols_(b.weight.data, s, _groups(b))
        add_output_shift_(b, shift, following_bn(qmodel, stats, p.b))
        overrides[p.b] = (eat, eat)
        compensated.add(p.b)
        summary[f"{p.a}->{p.b}"] = float((s - 1).abs().mean())
    return summary


def _apply(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w)


def noise_moments(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, dw: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel ``(rho, r)``: correlation of ``dw * x`` with ``w * x`` and the ratio of
    their variances, over the samples ``x``."""
    z, e = _apply(layer, x, w), _apply(layer, x, dw)
    dims = [d for d in range(z.dim()) if d != 1]
    zc, ec = z - z.mean(dims, keepdim=True), e - e.mean(dims, keepdim=True)
    vz, ve = zc.pow(2).mean(dims), ec.pow(2).mean(dims)
    rho = (zc * ec).mean(dims) / (vz * ve).sqrt().clamp_min(1e-30)
    return rho, ve / vz.clamp_min(1e-30)


def _compensate(qmodel: nn.Module, stats: BNStats, p: Pair, w_ref: torch.Tensor, act_noise: bool,
                out_noise: bool, clip: bool, cov_mode: str = "noise", fit: str = "mse"):
    a = qmodel.get_submodule(p.a)
    tm = stats.modules[p.act]
    if tm.pre is None:
        raise ValueError(f"{p.act}: no pre-activation statistics")
    wq = a.qweight().detach()
    dw = wq - w_ref
    g = _groups(a)
    xin = stats.layer_inputs.get(p.a)
    var_x = xin.std.pow(2) if xin is not None else torch.ones(a.weight.shape[1] * g, device=a.weight.device)
    if cov_mode == "noise" and p.a in stats.inputs:
        rho, r = noise_moments(a, stats.inputs[p.a], w_ref, dw)
        var_z = tm.pre.std.pow(2)
        var_e = r * var_z
        cov = rho * r.sqrt() * var_z
    elif cov_mode in ("noise", "independent"):
        var_e = channel_matvec(dw.pow(2), var_x, g)
        cov = channel_matvec(dw * w_ref, var_x, g)
    else:
        raise ValueError(f"udfc cov must be one of {', '.join(COV_MODES)}, got {cov_mode}")
    if act_noise:
        qin = layer_input_quantizer(qmodel, stats, p.a)
        if qin is not None:
            d_in = float(qin.scale.reshape(-1)[0])
            var_e = var_e + channel_matvec(wq.pow(2), torch.full_like(var_x, d_in * d_in / 12.0), g)
    qa = getattr(qmodel.get_submodule(p.act), "aq_out", None)
    lo, hi, step = -math.inf, math.inf, 0.0
    if qa is not None and qa.mode == "quant":
        if clip:
            lo, hi = quantizer_bounds(qa)
        if out_noise:
            step = float(qa.scale.reshape(-1)[0])
    return compensation(tm.pre.mean, tm.pre.std, var_e, cov, tm.act, lo, hi, step, tm.slope, fit=fit)
