"""Synthesis-free quantizers: DFQ, SQuant and UDFC, and the ``dfq`` pre-step (issue 7).

Registered in :data:`zsq.recipes.QUANTIZERS` / :data:`~zsq.recipes.PRE_STEPS` on import (the recipe
catalogue imports this module; the recipes of the same names are declared in :mod:`zsq.catalogue.datafree`):

* pre-step ``dfq``: cross-layer equalization + high-bias absorption on the FP model, BatchNorm kept
  (:func:`zsq.ptq.dfq.dfq_prestep`); chain it before any recipe with ``--pre dfq``;
* quantizers ``dfq``, ``squant``, ``udfc`` (their recipes: ``synth=None``, native protocol ``fixed``).

Every quantizer here runs the same skeleton (:func:`run_datafree`):

1. BN statistics of the FP model **before** folding (``ctx.model`` is unfolded; one BN-consistent
   noise forward, :func:`zsq.ptq.bn_ranges.collect_stats`);
2. :func:`~zsq.quant.protocol.apply_protocol` (folds BN, places quantizers, weight ranges from
   ``w_observer``);
3. activation ranges from the BN statistics (``act_range``: ``ksigma`` = mean + k std of the
   pre-activation with ``k`` per bit width, ``mse`` = expected-MSE-optimal under the BN Gaussian
   model, ``data`` = calibrate on ``ctx.images`` when a synthesizer / ``--calib`` provides them);
4. weight rounding (``rounding``: ``nearest`` or SQuant's ``squant`` / ``squant-k`` / ``squant-c``);
5. DFQ's analytic bias correction (``bias_correction``; ``bc_act`` also removes the expected shift
   from clipping at the activation ranges), or, for ``udfc``, the layer-by-layer compensation
   through the next layer (which includes the bias correction).

Settings (types, defaults and one line each in :class:`DataFreeConfig`, :class:`SQuantConfig` and the pre-step's
:class:`~zsq.ptq.dfq.DFQPreConfig`; the recipes' values in :mod:`zsq.catalogue.datafree`): ``w_observer`` (minmax | mse),
``act_range``, ``k`` (number or {bits: k}), ``rounding``, ``bias_correction``, ``bc_act``,
``stats_batch`` (noise images of the BN-consistent forward), ``threads`` (intra-op threads while
quantizing, default 1: see :func:`threads`), and for the pre-step ``cle``,
``absorb``, ``absorb_sigma``, ``absorb_padded``, ``relu6`` (skip | replace).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config, setting
from ..errors import BadValueError
from ..quant.observers import OBSERVERS, WEIGHT_OBSERVERS
from ..recipes import HPARAM_KEYS, PRE_STEPS, QUANTIZERS, QuantContext
from ..record import record_of
from .bn_ranges import DEFAULT_K, collect_stats, require_batchnorm, set_act_ranges
from .dfq import DFQPreConfig, bias_correct, dfq_prestep, find_pairs
from .squant import MODES, squant_model_
from .udfc import COV_MODES, FITS, udfc_quantize_

#: ``act_range`` values: activation ranges from the BN statistics (k sigma, expected-MSE) or from calibration images
ACT_RANGES = ("ksigma", "mse", "data")


@dataclass
class DataFreeConfig(Config):
    """The settings of the ``dfq`` and ``udfc`` quantizers (``--set``; the recipes' paper values are in
    :mod:`zsq.catalogue.datafree`); ``squant``'s are :class:`SQuantConfig`."""

    w_observer: str = setting("minmax", choices=WEIGHT_OBSERVERS)  # weight ranges (per the protocol's granularity)
    a_observer: str = setting("minmax", choices=OBSERVERS)  # act_range=data: the observer over the images
    act_range: str = setting("ksigma", choices=ACT_RANGES)  # activation ranges: k sigma / expected-MSE / images
    k: float | dict[int, float] = setting(factory=lambda: dict(DEFAULT_K))  # ksigma's k, or a table bits -> k
    stats_batch: int | None = setting(None, minimum=1)  # noise images of the BN statistics forward (None: its own)
    rounding: str = setting("nearest", choices=MODES)  # weight rounding: nearest or SQuant's (squant-e = nearest)
    bias_correction: bool = True  # DFQ's analytic bias correction (udfc: inside its compensation)
    bc_act: bool = False  # the correction also removes the expected shift from clipping at the activation ranges
    udfc_act_noise: bool = False  # udfc: add the input quantizer's rounding noise to the error model
    udfc_out_noise: bool = False  # udfc: the activation output rounded too (noise D^2/12)
    udfc_clip: bool = True  # udfc: the activation clipped to its quantizer's range
    udfc_cov: str = setting("noise", choices=COV_MODES)  # udfc: how the error covaries with the input
    udfc_fit: str = setting("mse", choices=FITS)  # udfc: the gain fit (mse, or undo the gain only)
    threads: int | None = setting(1, minimum=0)  # intra-op threads while quantizing (0 / None: torch's count)


@dataclass
class SQuantConfig(DataFreeConfig):
    """``squant``'s settings: :class:`DataFreeConfig` with SQuant's rounding and no bias correction."""

    rounding: str = setting("squant", choices=MODES)  # CASE: kernel- then channel-level flips
    bias_correction: bool = False  # SQuant corrects nothing after rounding


#: each data-free quantizer's config
CONFIGS: dict[str, type[DataFreeConfig]] = {"dfq": DataFreeConfig, "squant": SQuantConfig, "udfc": DataFreeConfig}
#: the hparams every synthesis-free recipe sets: the configs' defaults
COMMON_HPARAMS = {k: v for k, v in DataFreeConfig().to_dict().items()
                  if k in ("w_observer", "act_range", "k", "stats_batch")}


@contextlib.contextmanager
def threads(n: int | None):
    """Run with ``n`` intra-op threads, then restore. Everything here works on small tensors (weights,
    one noise batch), where OpenMP synchronisation costs more than a second thread gains: on a loaded
    2-core machine SQuant's rounding of ResNet-20 takes 0.08 s on one thread and 4 s on two."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@PRE_STEPS.register("dfq")
def pre_dfq(model: nn.Module, hparams: dict) -> nn.Module:
    """DFQ's cross-layer equalization (iterated over conv/linear pairs through ReLU, depthwise-separable
    pairs included) and high-bias absorption; BatchNorm kept, FP function unchanged."""
    cfg = DFQPreConfig.from_hparams(hparams)
    with threads(cfg.threads):
        return dfq_prestep(model, cfg)


def run_datafree(ctx: QuantContext, method: str) -> nn.Module:
    """The shared skeleton (module doc) with ``method`` in dfq | squant | udfc; settings: ``CONFIGS[method]``
    from ``ctx.hparams`` (the keys that are not its own belong to the pre-step)."""
    cfg = CONFIGS[method].from_hparams(ctx.hparams)
    with threads(cfg.threads):
        return _run(ctx, method, cfg)


def _run(ctx: QuantContext, method: str, h: DataFreeConfig) -> nn.Module:
    from ..ptq.calibrate import calibrate
    from ..quant.protocol import apply_protocol

    t0 = time.perf_counter()
    require_batchnorm(ctx.model, f"the {method} quantizer")
    rounding = "nearest" if h.rounding == "squant-e" else h.rounding
    act_range = h.act_range
    # UDFC needs no positive homogeneity (its compensation is a fit through the activation), so
    # ReLU6 pairs count; the model itself is not changed by find_pairs
    pairs = find_pairs(ctx.model, relu6="replace") if method == "udfc" else []
    stats = collect_stats(ctx.model, n=h.stats_batch, seed=ctx.seed, what=f"the {method} quantizer",
                          keep_inputs={p.a for p in pairs})
    q = apply_protocol(ctx.model, ctx.protocol, ctx.w_bits, ctx.a_bits, policy=ctx.policy,
                       w_observer=h.w_observer, a_observer=h.a_observer,
                       strict=ctx.strict)
    if act_range == "data":
        if ctx.images is None:
            raise BadValueError("act_range=data needs calibration images (a synthesizer, --synthetic or --calib)")
        calibrate(q, ctx.images, observer=h.a_observer)
    else:
        set_act_ranges(q, stats, k=h.k, mode=act_range, seed=ctx.seed)
    bc, bc_act = h.bias_correction, h.bc_act
    info: dict = {"method": method, "rounding": rounding, "act_range": act_range, "bias_correction": bc}
    if method == "udfc":
        info["udfc"] = udfc_quantize_(q, stats, pairs, rounding=rounding, act_aware=bc_act,
                                      act_noise=h.udfc_act_noise, out_noise=h.udfc_out_noise, clip=h.udfc_clip,
                                      bias_correction=bc, cov=h.udfc_cov, fit=h.udfc_fit)
    else:
        fp_w = {n: m.weight.detach().clone() for n, m in q.named_modules() if hasattr(m, "wq")}
        if rounding != "nearest":
            squant_model_(q, rounding)
        if bc:
            bias_correct(q, stats, fp_w, act_aware=bc_act)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    record_of(q).methods["datafree"] = info
    return q


HPARAM_KEYS.update({name: frozenset(cls.settings()) for name, cls in CONFIGS.items()})
HPARAM_KEYS["pre:dfq"] = frozenset(DFQPreConfig.settings())


@QUANTIZERS.register("dfq")
def quant_dfq(ctx: QuantContext) -> nn.Module:
    """DFQ (Nagel et al. 2019): activation ranges from BN statistics, round-to-nearest weights,
    analytic bias correction from the BN statistics (CLE and high-bias absorption are the ``dfq``
    pre-step)."""
    return run_datafree(ctx, "dfq")


@QUANTIZERS.register("squant")
def quant_squant(ctx: QuantContext) -> nn.Module:
    """SQuant (Guo et al. 2022): CASE rounding (kernel- then channel-level flips), vectorised;
    activation ranges from BN statistics; no bias correction by default."""
    return run_datafree(ctx, "squant")


@QUANTIZERS.register("udfc")
def quant_udfc(ctx: QuantContext) -> nn.Module:
    """UDFC (Bai et al. 2023), quantization part: each layer's quantization error compensated in
    closed form through the next layer's input channels, from BN statistics (zsq.ptq.udfc)."""
    return run_datafree(ctx, "udfc")
