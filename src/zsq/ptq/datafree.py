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

hparams common to the three (defaults per recipe in :mod:`zsq.catalogue.datafree`): ``w_observer`` (minmax | mse),
``act_range``, ``k`` (number or {bits: k}), ``rounding``, ``bias_correction``, ``bc_act``,
``stats_batch`` (noise images of the BN-consistent forward), ``threads`` (intra-op threads while
quantizing, default 1: see :func:`threads`), and for the pre-step ``cle``,
``absorb``, ``absorb_sigma``, ``absorb_padded``, ``relu6`` (skip | replace).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ..errors import BadValueError
from ..recipes import HPARAM_KEYS, PRE_STEPS, QUANTIZERS, QuantContext
from .bn_ranges import DEFAULT_K, collect_stats, require_batchnorm, set_act_ranges
from .dfq import bias_correct, dfq_prestep, find_pairs
from .squant import MODES, squant_model_
from .udfc import udfc_quantize_

#: ``act_range`` values: activation ranges from the BN statistics (k sigma, expected-MSE) or from calibration images
ACT_RANGES = ("ksigma", "mse", "data")
#: the hparams every synthesis-free recipe sets (and its defaults there)
COMMON_HPARAMS = {"w_observer": "minmax", "act_range": "ksigma", "k": dict(DEFAULT_K), "stats_batch": None}


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
    with threads(hparams.get("threads", 1)):
        return dfq_prestep(model, hparams)


def run_datafree(ctx: QuantContext, method: str) -> nn.Module:
    """The shared skeleton (module doc) with ``method`` in dfq | squant | udfc."""
    with threads(ctx.hparams.get("threads", 1)):
        return _run(ctx, method)


def _run(ctx: QuantContext, method: str) -> nn.Module:
    from ..ptq.calibrate import calibrate
    from ..quant.protocol import apply_protocol

    h = ctx.hparams
    t0 = time.perf_counter()
    require_batchnorm(ctx.model, f"the {method} quantizer")
    rounding = h.get("rounding", "squant" if method == "squant" else "nearest")
    if rounding not in MODES:
        raise BadValueError(f"rounding must be one of {', '.join(MODES)}, got '{rounding}'")
    if rounding == "squant-e":
        rounding = "nearest"
    act_range = h.get("act_range", "ksigma")
    if act_range not in ACT_RANGES:
        raise BadValueError(f"act_range must be one of {', '.join(ACT_RANGES)}, got '{act_range}'")
    # UDFC needs no positive homogeneity (its compensation is a fit through the activation), so
    # ReLU6 pairs count; the model itself is not changed by find_pairs
    pairs = find_pairs(ctx.model, relu6="replace") if method == "udfc" else []
    stats = collect_stats(ctx.model, n=h.get("stats_batch"), seed=ctx.seed, what=f"the {method} quantizer",
                          keep_inputs={p.a for p in pairs})
    q = apply_protocol(ctx.model, ctx.protocol, ctx.w_bits, ctx.a_bits, policy=ctx.policy,
                       w_observer=h.get("w_observer", "minmax"), a_observer=h.get("a_observer", "minmax"),
                       strict=ctx.strict)
    if act_range == "data":
        if ctx.images is None:
            raise BadValueError("act_range=data needs calibration images (a synthesizer, --synthetic or --calib)")
        calibrate(q, ctx.images, observer=h.get("a_observer", "minmax"))
    else:
        set_act_ranges(q, stats, k=h.get("k"), mode=act_range, seed=ctx.seed)
    bc = bool(h.get("bias_correction", method != "squant"))
    bc_act = bool(h.get("bc_act", False))
    info: dict = {"method": method, "rounding": rounding, "act_range": act_range, "bias_correction": bc}
    if method == "udfc":
        info["udfc"] = udfc_quantize_(q, stats, pairs, rounding=rounding, act_aware=bc_act,
                                      act_noise=bool(h.get("udfc_act_noise", False)),
                                      out_noise=bool(h.get("udfc_out_noise", False)),
                                      clip=bool(h.get("udfc_clip", True)), bias_correction=bc,
                                      cov=h.get("udfc_cov", "noise"), fit=h.get("udfc_fit", "mse"))
    else:
        fp_w = {n: m.weight.detach().clone() for n, m in q.named_modules() if hasattr(m, "wq")}
        if rounding != "nearest":
            squant_model_(q, rounding)
        if bc:
            bias_correct(q, stats, fp_w, act_aware=bc_act)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    q.zsq_datafree = info
    return q


_KEYS = frozenset(COMMON_HPARAMS) | {"a_observer", "rounding", "bias_correction", "bc_act", "udfc_act_noise",
                               "udfc_out_noise", "udfc_clip", "udfc_cov", "udfc_fit", "threads"}
HPARAM_KEYS.update({"dfq": _KEYS, "squant": _KEYS, "udfc": _KEYS,
                    "pre:dfq": frozenset({"cle", "cle_iters", "absorb", "absorb_sigma", "absorb_padded", "relu6",
                                          "threads"})})


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
