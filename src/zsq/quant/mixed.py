"""Mixed-precision weight bits without data (ZeroQ's sensitivity search, Cai et al. 2020, Sec. 3.3).

Each searchable layer ``l`` gets one bit width ``b_l`` from the candidates (2/3/4/6/8 by default).
Its *sensitivity* ``S_l(b)`` is measured on the images the quantizer calibrates with (the recipe's
synthetic set, or ``--calib`` images); the allocation minimises ``sum_l S_l(b_l)`` under a budget,
solved exactly as a 0/1 integer program (multiple-choice knapsack) by ``scipy.optimize.milp`` (HiGHS,
relative gap 0).

Sensitivities (``kind``):

* ``kl`` (default, ZeroQ): ``KL(softmax(f(x)) || softmax(f_l,b(x)))`` averaged over the images, where
  ``f_l,b`` is the full-precision model with *only* layer ``l``'s weights quantized at ``b`` bits
  (min-max range, the protocol's per-channel / symmetric setting; BN folded when the protocol folds).
* ``hessian`` (HAWQ-v2, Dong et al. 2020): ``Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2`` with the trace of
  the loss Hessian block of layer ``l`` estimated by Hutchinson's method (Rademacher probes, ``samples``
  of them, one Hessian-vector product each for all layers). The loss is the cross-entropy against the
  synthesis labels when the synthesizer made some, else against the FP model's own top-1 (no real
  label is ever read); a negative trace estimate counts as 0.

Synthesis-free recipes (squant, dfq, ...) have no images: their sensitivities are read on
``n_images`` standard-normal inputs (the model's normalised input space; the start of ZeroQ's own
distillation), seeded from ``--seed``.

Which layers are searched: every quantized Conv/Linear whose weight bits the protocol does not pin
(``ptq``/``fixed``/``genie-native`` keep the first conv and the last linear at 8 bits), that
``--keep-fp`` leaves quantized and that no ``--layer-bits`` pattern sets. Budgets:

* ``wbits_avg`` B: ``sum_l n_l b_l <= B * sum_l n_l`` over the searched layers (``n_l``: weight count),
  so B = 4 is exactly the weight memory of uniform W4;
* ``size_mb`` M: the quantized model's total weight memory, ``model_size``'s count (packed weights at
  their bits, 8 bytes of scale and zero point per channel, every other parameter fp32), at most
  ``M * 10^6`` bytes.

* ``bops_g`` G (*activation bits searched too*): the bit-operations of the searched layers, at most
  ``G * 10^9``. The BOPs of a Conv/Linear are its MACs (per image, every call) x its weight bits x the bits
  of its input activation (the quantizer on the tensor the layer reads; 32 when that tensor is not
  quantized, e.g. the network input). The *searched layers* here are the Conv/Linear layers whose weight
  bits or input-activation bits the search chooses (a protocol-pinned W8 layer whose input is searched
  counts at W8); pinned layers outside them are not counted (the record also gives the whole model's
  BOPs, ``model_bops_g``). Each searchable activation quantizer (a layer-input quantizer whose bits a
  ``--layer-bits`` A sets: not pinned by the protocol's first/last A8, by a ``--layer-bits`` pattern, or tied
  to other tensors as ``deploy``'s output sites are) takes one width from ``act_candidates`` (4/6/8 by
  default: 2/3-bit activations ruin post-training accuracy); its sensitivity is the KL of the output with
  only that quantizer on (min-max range observed on the same images), in both ``kl`` and ``hessian`` modes
  (the Hessian modes' weight terms and the activations' KL terms are both second-order estimates of the
  loss increase, summed as they are). The program is solved over one 0/1 variable per layer per
  (weight bits, input bits) pair, tied to one choice per activation quantizer (layers reading the same
  tensor share it), with the BOPs row linear in the pair variables: still exact.

The result is a ``{layer: w_bits}`` table; :func:`mixed_policy` puts it into the
:class:`~zsq.spec.LayerPolicy` as weight-only ``layer_bits`` entries (activation bits stay the
protocol's; ``(w, a)`` entries under ``bops_g``), the path ``--layer-bits`` takes, so every quantizer
follows it. Sensitivities are cached
under ``ZSQ_CACHE/mixed/<key>.json`` (key: weights, data, protocol, policy and search settings).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import BadValueError
from ..spec import LayerPolicy, Protocol, check_bits

SENSITIVITIES = ("kl", "hessian")
DEFAULT_CANDIDATES = (2, 3, 4, 6, 8)
DEFAULT_ACT_CANDIDATES = (4, 6, 8)
#: what ``--bops`` counts (zsq.json ``mixed.bops.scope``)
BOPS_SCOPE = ("searched layers: Conv/Linear whose weight or input-activation bits are searched; "
              "MACs per image x w_bits x a_bits (a_bits 32 for an unquantized input)")
CACHE_FORMAT = "zsq-mixed-sens-1"


class InfeasibleBudgetError(BadValueError):
    """The budget is below the smallest allocation the candidates allow."""


def _bit_list(value, flag: str) -> tuple[int, ...]:
    """A candidate list (``"2,4,8"`` or a sequence) as sorted distinct bit widths in 2..8."""
    items = tuple(x for x in value.replace(" ", "").split(",") if x) if isinstance(value, str) else tuple(value)
    bits = sorted({check_bits(b, flag) for b in items})
    if not bits or any(b > 8 for b in bits):
        raise BadValueError(f"{flag} takes bit widths in 2..8, got {','.join(map(str, items))}")
    return tuple(bits)


@dataclass
class MixedConfig:
    """A mixed-precision search: one budget (``wbits_avg``, ``size_mb`` or ``bops_g``), the candidate bits, the
    sensitivity kind and how much data it reads.

    Args:
        wbits_avg: average weight bits (parameter-weighted) over the searched layers.
        size_mb: total weight memory of the quantized model in MB (10^6 bytes).
        candidates: bit widths a layer may take.
        sensitivity: ``kl`` (ZeroQ) or ``hessian`` (Hutchinson trace, HAWQ-v2).
        n_images: images the sensitivity reads (the first ones of the set; Gaussian inputs when none).
        batch_size: images per forward.
        samples: Hutchinson probes (``hessian`` only).
        bops_g: giga bit-operations of the searched layers (weight *and* input-activation bits searched).
        act_candidates: input-activation bit widths a ``bops_g`` search may give a layer's input.
    """

    wbits_avg: float | None = None
    size_mb: float | None = None
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    sensitivity: str = "kl"
    n_images: int = 128
    batch_size: int = 64
    samples: int = 32
    bops_g: float | None = None
    act_candidates: tuple[int, ...] = DEFAULT_ACT_CANDIDATES

    def __post_init__(self):
        if sum(v is not None for v in (self.wbits_avg, self.size_mb, self.bops_g)) != 1:
            raise BadValueError("give exactly one mixed-precision budget: --wbits-avg B, --size MB or --bops G")
        for name in ("wbits_avg", "size_mb", "bops_g"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                                  or v <= 0):
                flag = {"wbits_avg": "--wbits-avg", "size_mb": "--size", "bops_g": "--bops"}[name]
                raise BadValueError(f"{flag} must be a positive number, got {v!r}")
        self.act_candidates = _bit_list(self.act_candidates, "--mp-abits")
        self.candidates = _bit_list(self.candidates, "--mp-bits")
        if self.sensitivity not in SENSITIVITIES:
            raise BadValueError(f"--mp-sensitivity must be one of {', '.join(SENSITIVITIES)}, "
                                f"got '{self.sensitivity}'")
        for name in ("n_images", "batch_size", "samples"):
            if int(getattr(self, name)) < 1:
                raise BadValueError(f"mixed-precision {name} must be >= 1, got {getattr(self, name)}")

    def budget(self) -> dict:
        if self.bops_g is not None:
            return {"kind": "bops_g", "value": self.bops_g}
        return ({"kind": "wbits_avg", "value": self.wbits_avg} if self.wbits_avg is not None
                else {"kind": "size_mb", "value": self.size_mb})

    def w_bits(self) -> int:
        """The uniform ``--w`` recorded beside a search (``bits.w``): the largest candidate not above
        the average budget (the smallest candidate for a size or BOPs budget)."""
        if self.wbits_avg is None:
            return self.candidates[0]
        return max([b for b in self.candidates if b <= self.wbits_avg] or [self.candidates[0]])


@dataclass
class MixedResult:
    bits: dict[str, int]  # searched layer -> weight bits
    sensitivity: dict[str, dict[int, float]]  # layer -> {bits: S}
    params: dict[str, int]  # layer -> weight count
    objective: float
    wbits_avg: float  # parameter-weighted mean over the searched layers
    q_bytes: int  # the quantized model's weight memory (model_size's count)
    pinned: dict[str, int] = field(default_factory=dict)  # quantized layers not searched -> bits
    timing: dict[str, float] = field(default_factory=dict)
    data: str = "synthetic"
    cached: bool = False
    cpu_s: float = 0.0  # CPU seconds of all threads (robust to a shared machine)
    acts: dict | None = None  # --bops only: the activation side (see ActSearch.record)

    def entries(self) -> dict:
        """The policy entries of the search: ``{layer: w}`` (weight-only), or ``{layer: (w, a)}`` for every layer
        whose input bits were searched under ``bops_g`` (a pinned-weight layer keeps its pinned w)."""
        if not self.acts:
            return dict(self.bits)
        out: dict = {n: (b, None) for n, b in self.bits.items()}
        for n, a in self.acts["searched_inputs"].items():
            out[n] = (self.bits.get(n, self.pinned.get(n)), a)
        return out

    def record(self, cfg: MixedConfig) -> dict:
        """The ``mixed`` entry of zsq.json."""
        if not self.acts:
            return self._record(cfg)
        return {**self._record(cfg), "objective": "min sum of per-layer weight and input-activation sensitivities "
                "(milp, exact)", **self.acts["record"]}

    def _record(self, cfg: MixedConfig) -> dict:
        return {"sensitivity": cfg.sensitivity, "budget": cfg.budget(), "candidates": list(cfg.candidates),
                "objective": "min sum of per-layer sensitivities (milp, exact)",
                "objective_value": self.objective, "data": self.data, "n_images": cfg.n_images,
                **({"samples": cfg.samples} if cfg.sensitivity == "hessian" else {}),
                "wbits_avg": round(self.wbits_avg, 4), "q_bytes": self.q_bytes,
                "bits": dict(self.bits), "pinned": dict(self.pinned),
                "sensitivities": {n: {str(b): s for b, s in d.items()} for n, d in self.sensitivity.items()},
                "search_s": round(sum(self.timing.values()), 2), "search_cpu_s": round(self.cpu_s, 2),
                "cached": self.cached}


# -------------------------------------------------------------------------------------------------
# the layers of a search
# -------------------------------------------------------------------------------------------------
def _probe_model(model: nn.Module, protocol: Protocol, policy: LayerPolicy):
    """The model laid out by ``protocol`` (BN folded as it folds) with every quantizer off, the searched
    layers (name -> module) and the pinned ones (name -> bits). A layer is pinned when the protocol or a
    ``--layer-bits`` pattern sets its bits: laid out at a sentinel W (7), a layer at other bits is pinned."""
    from ..record import record_of
    from .protocol import apply_protocol, set_act_mode

    user = LayerPolicy(tuple(policy.keep_fp), dict(policy.layer_bits))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = apply_protocol(model, protocol, _SENTINEL, 8, policy=user, w_observer="minmax")
    set_act_mode(q, "off")
    searched, pinned = {}, {}
    for name, bits in record_of(q).layout.weights.items():
        m = q.get_submodule(name)
        m.wq.mode = "off"
        if bits != _SENTINEL or policy.bits_for(name) is not None:
            pinned[name] = bits
        else:
            searched[name] = m
    return q, searched, pinned


_SENTINEL = 7


# -------------------------------------------------------------------------------------------------
# sensitivities
# -------------------------------------------------------------------------------------------------
def _set_weight_bits(m: nn.Module, bits: int) -> None:
    wq = m.wq
    wq.bits = bits
    wq.init_from_tensor(m.weight.detach(), "minmax")
    wq.mode = "quant"


def _mean_kl(q: nn.Module, batches, ref, n: int) -> float:
    """Mean KL(FP output || ``q``'s output) over ``batches`` (``ref``: the FP log-softmax of each), >= 0."""
    tot = 0.0
    for x, lp in zip(batches, ref):
        lq = F.log_softmax(q(x).float(), dim=1)
        tot += float((lp.exp() * (lp - lq)).sum())
    return max(tot / n, 0.0)


def kl_sensitivity(q: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor, candidates, *,
                   batch_size: int = 64, progress: bool = False) -> dict[str, dict[int, float]]:
    """ZeroQ's sensitivity: mean KL(FP output || output with only layer l at b bits) over ``images``."""
    from ..progress import counting

    dev = next((p.device for p in q.parameters()), images.device)
    batches = [x.to(dev) for x in images.split(batch_size)]  # the model's device
    with torch.inference_mode():
        ref = [F.log_softmax(q(x).float(), dim=1) for x in batches]
        out: dict[str, dict[int, float]] = {}
        with counting(progress, "sensitivity (kl)", len(layers) * len(candidates)) as advance:
            for name, m in layers.items():
                out[name] = {}
                for b in candidates:
                    _set_weight_bits(m, b)
                    out[name][b] = _mean_kl(q, batches, ref, images.shape[0])
                    advance(1)
                m.wq.mode = "off"
    return out


def hutchinson_traces(q: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor,
                      labels: torch.Tensor | None, *, samples: int = 32, batch_size: int = 64, seed: int = 0,
                      progress: bool = False) -> dict[str, float]:
    """Per-layer ``Tr(H_l)`` of the mean cross-entropy, Hutchinson's estimate with ``samples`` Rademacher
    probes (the same probes on every batch: the estimate of the whole-set loss)."""
    from ..progress import counting

    params = [m.weight for m in layers.values()]
    req = [p.requires_grad for p in q.parameters()]
    for p in q.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    n = images.shape[0]
    dev = params[0].device if params else images.device
    images = images.to(dev)  # the model's device (labels follow it)
    labels = labels.to(dev) if labels is not None else None
    tr = [0.0] * len(params)
    try:
        if labels is None:
            with torch.no_grad():
                labels = torch.cat([q(x).argmax(1) for x in images.split(batch_size)])
        with counting(progress, "sensitivity (hessian)", samples * math.ceil(n / batch_size)) as advance:
            for x, y in zip(images.split(batch_size), labels.split(batch_size)):
                with torch.enable_grad():
                    loss = F.cross_entropy(q(x).float(), y.long(), reduction="sum") / n
                    grads = torch.autograd.grad(loss, params, create_graph=True)
                    for s in range(samples):
                        g = torch.Generator().manual_seed(seed * 1_000_003 + s)
                        vs = [torch.randint(0, 2, p.shape, generator=g).to(device=p.device, dtype=p.dtype) * 2 - 1
                              for p in params]  # drawn on the CPU: the same probes on every device
                        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=s < samples - 1)
                        for i, (v, h) in enumerate(zip(vs, hv)):
                            tr[i] += float((v * h).sum()) / samples
                        advance(1)
    finally:
        for p, r in zip(q.parameters(), req):
            p.requires_grad_(r)
    return {name: t for name, t in zip(layers, tr)}


def hessian_sensitivity(q, layers, images, labels, candidates, *, samples=32, batch_size=64, seed=0,
                        progress=False) -> dict[str, dict[int, float]]:
    """HAWQ-v2's ``max(Tr(H_l), 0) / n_l * ||Q_b(W_l) - W_l||^2``."""
    traces = hutchinson_traces(q, layers, images, labels, samples=samples, batch_size=batch_size, seed=seed,
                               progress=progress)
    out = {}
    with torch.no_grad():
        for name, m in layers.items():
            w = m.weight.detach()
            t = max(traces[name], 0.0) / w.numel()
            out[name] = {}
            for b in candidates:
                _set_weight_bits(m, b)
                out[name][b] = t * float(((m.wq(w) - w) ** 2).sum())
            m.wq.mode = "off"
    return out


# -------------------------------------------------------------------------------------------------
# the exact allocation
# -------------------------------------------------------------------------------------------------
def weight_bytes(n: int, bits: int) -> int:
    """Packed bytes of ``n`` weights at ``bits`` (``zsq.api.model_size``'s count)."""
    return (n * bits + 7) // 8


def fixed_bytes(q: nn.Module, searched: dict[str, nn.Module]) -> int:
    """``model_size``'s q_bytes of the laid-out model without the packed weights of the searched layers."""
    from .modules import QUANT_LAYERS, Quantizer

    qb, counted = 0, set()
    qparams = {id(getattr(m, "scale", None)) for m in q.modules() if isinstance(m, Quantizer)}
    searched_ids = {id(m) for m in searched.values()}
    for m in q.modules():
        if isinstance(m, QUANT_LAYERS):
            if id(m) not in searched_ids:
                qb += weight_bytes(m.weight.numel(), m.wq.bits)
            qb += m.wq.scale.numel() * 8
            counted.add(id(m.weight))
    qb += sum(p.numel() * 4 for p in q.parameters() if id(p) not in counted and id(p) not in qparams)
    return int(qb)


def _costs(cfg: MixedConfig, params: dict[str, int], fixed: int) -> tuple[dict[str, dict[int, int]], int, str]:
    """Integer cost of each (layer, bits) and the capacity: bit-parameters for ``wbits_avg`` (exact
    rational arithmetic), bytes for ``size_mb``; with a unit word for messages."""
    if cfg.wbits_avg is not None:
        total = sum(params.values())
        cap = math.floor(Fraction(str(cfg.wbits_avg)) * total)
        return {n: {b: k * b for b in cfg.candidates} for n, k in params.items()}, cap, "bits"
    cap = math.floor(Fraction(str(cfg.size_mb)) * 10**6) - fixed
    return {n: {b: weight_bytes(k, b) for b in cfg.candidates} for n, k in params.items()}, cap, "bytes"


def _smallest_budget(cfg: MixedConfig, params: dict[str, int], fixed: int) -> str:
    lo = min(cfg.candidates)
    if cfg.wbits_avg is not None:
        return f"--wbits-avg {lo} (every searched layer at {lo} bits)"
    need = fixed + sum(weight_bytes(k, lo) for k in params.values())
    mb = math.ceil(need / 100) / 10**4  # MB with 4 decimals, rounded up so that it is feasible
    return f"--size {mb:.4f} MB ({need} bytes: every searched layer at {lo} bits)"


def solve(sens: dict[str, dict[int, float]], cost: dict[str, dict[int, int]], cap: int) -> tuple[dict[str, int], float]:
    """Minimise ``sum S_l(b_l)`` subject to ``sum cost_l(b_l) <= cap``, one bit width per layer: a 0/1
    integer program solved by ``scipy.optimize.milp`` (HiGHS) with a zero gap. ``None`` if infeasible."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(sens)
    opts = [(n, b) for n in names for b in sorted(sens[n])]
    c = np.array([sens[n][b] for n, b in opts], dtype=np.float64)
    # HiGHS stops at an absolute gap of 1e-6 whatever mip_rel_gap says: the objective is scaled to a
    # largest coefficient of 1e6, so that sensitivities down to ~1e-12 of the largest still count
    c = c * (1e6 / c.max()) if c.max() > 0 else c
    onehot = np.zeros((len(names), len(opts)))
    for j, (n, _) in enumerate(opts):
        onehot[names.index(n), j] = 1.0
    w = np.array([[cost[n][b] for n, b in opts]], dtype=np.float64)
    # scale the capacity row to ~1 so HiGHS's feasibility tolerance is far below one unit of cost
    scale = max(float(w.max()), 1.0)
    cons = [LinearConstraint(onehot, 1, 1), LinearConstraint(w / scale, -np.inf, cap / scale)]
    r = milp(c, constraints=cons, integrality=np.ones(len(opts)), bounds=Bounds(0, 1),
             options={"mip_rel_gap": 0.0, "presolve": True})
    if r.x is None:
        return None, math.inf
    x = np.round(r.x).astype(int)
    bits = {n: b for (n, b), xi in zip(opts, x) if xi}
    used = sum(cost[n][b] for n, b in bits.items())
    if len(bits) != len(names) or used > cap:  # never trust a rounded point beyond the exact budget
        raise BadValueError("the bit allocation solver returned a point outside the budget; "
                            "try a slightly larger budget")
    return bits, float(sum(sens[n][b] for n, b in bits.items()))


def brute_force(sens, cost, cap) -> tuple[dict[str, int] | None, float]:
    """Every allocation tried (tests: tiny models only)."""
    names = list(sens)
    best, val = None, math.inf
    for combo in itertools.product(*[sorted(sens[n]) for n in names]):
        if sum(cost[n][b] for n, b in zip(names, combo)) <= cap:
            v = sum(sens[n][b] for n, b in zip(names, combo))
            if v < val:
                best, val = dict(zip(names, combo)), v
    return best, val


# -------------------------------------------------------------------------------------------------
# activation bits and BOPs (--bops)
# -------------------------------------------------------------------------------------------------
UNQUANTIZED_A = 32  # BOPs of a layer whose input tensor no quantizer holds (the network input, FP paths)


@dataclass
class ActProbe:
    """The activation side of a ``bops_g`` search, read off the laid-out model."""

    q: nn.Module  # laid out with every quantizer off (the KL probes switch one on)
    sites: dict[str, list[str]]  # searched activation quantizer -> the layers reading it (its consumers)
    layer_site: dict[str, str | None]  # every Conv/Linear -> the quantizer on its input (None: unquantized)
    fixed_a: dict[str, int]  # every Conv/Linear whose input is not searched -> its input bits (32: none)
    macs: dict[str, int]  # every Conv/Linear -> MACs per image (all its calls)
    scope: list[str]  # the layers --bops counts: weights or input searched


def layer_inputs(q: nn.Module, example: torch.Tensor) -> tuple[dict[str, str | None], dict[str, int]]:
    """Every Conv/Linear of a laid-out model (quantizers off): the activation quantizer on its input (the
    layer's own ``aq_in``, else the quantizer whose output tensor it reads; None when none) and its MACs per
    image over all its calls (output elements x weight elements per output channel)."""
    from .modules import Quantizer

    qout: dict[int, str] = {}
    keep, site, macs = [], {}, {}
    handles = []

    def qhook(name):
        def fn(mod, args, out):
            qout[id(out)] = name
            keep.append(out)
        return fn

    def lhook(name):
        def fn(mod, args, out):
            keep.append((args, out))
            if name not in site:
                aq = getattr(mod, "aq_in", None)
                site[name] = f"{name}.aq_in" if isinstance(aq, Quantizer) else qout.get(id(args[0]))
            w = mod.weight
            macs[name] = macs.get(name, 0) + out.numel() // example.shape[0] * (w.numel() // w.shape[0])
        return fn

    for name, m in q.named_modules():
        if isinstance(m, Quantizer) and not name.endswith(".wq") and name != "wq":
            handles.append(m.register_forward_hook(qhook(name)))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(lhook(name)))
    try:
        with torch.inference_mode():
            q(example)
    finally:
        for h in handles:
            h.remove()
    return site, macs


def _act_probe(model: nn.Module, protocol: Protocol, policy: LayerPolicy, searched: dict, pinned: dict[str, int],
               a_bits: int) -> ActProbe:
    """Which activation quantizers a search may set: lay the model out three times at the sentinel A7 (the
    user's policy alone, then every free layer's input at A5, then at A6; weights at the sentinel W7); a
    quantizer at 7 in the first layout (neither the protocol nor a --layer-bits pattern pins it) that follows
    the policy in the other two is searchable. The first layout gives every other input's bits (7: ``a_bits``)."""
    from .protocol import apply_protocol, example_input, set_act_mode

    free = {n: (_SENTINEL if n in searched else pinned[n]) for n in list(searched) + list(pinned)
            if policy.bits_for(n) is None}

    def lay(a):
        lb = dict(policy.layer_bits)
        if a is not None:
            lb.update({n: (w, a) for n, w in free.items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return apply_protocol(model, protocol, _SENTINEL, _SENTINEL, policy=LayerPolicy(tuple(policy.keep_fp), lb),
                                  w_observer="minmax")

    from ..record import record_of

    q1 = lay(None)
    base = {a.name: a.bits for a in record_of(q1).layout.acts}
    del q1
    q6 = lay(6)
    b6 = {a.name: a.bits for a in record_of(q6).layout.acts}
    del q6
    q = lay(5)
    b5 = {a.name: a.bits for a in record_of(q).layout.acts}
    set_act_mode(q, "off")
    for n in list(searched) + list(pinned):
        q.get_submodule(n).wq.mode = "off"
    layer_site, macs = layer_inputs(q, example_input(q))
    quantized = set(searched) | set(pinned)
    sites: dict[str, list[str]] = {}
    for layer, st in layer_site.items():
        if st is not None and base.get(st) == _SENTINEL and b5.get(st) == 5 and b6.get(st) == 6:
            sites.setdefault(st, []).append(layer)
    # a searched input is read by free quantized layers only (a --layer-bits or FP reader keeps it pinned)
    sites = {st: ls for st, ls in sites.items() if all(n in free for n in ls) and all(n in quantized for n in ls)}
    searched_in = {n for ls in sites.values() for n in ls}
    fixed_a = {n: (UNQUANTIZED_A if st is None else a_bits if base[st] == _SENTINEL else base[st])
               for n, st in layer_site.items() if n not in searched_in}
    scope = [n for n in layer_site if n in searched or n in searched_in]
    return ActProbe(q=q, sites=sites, layer_site=layer_site, fixed_a=fixed_a, macs=macs, scope=scope)


def kl_act_sensitivity(q: nn.Module, sites: list[str], images: torch.Tensor, candidates, *, batch_size: int = 64,
                       progress: bool = False) -> dict[str, dict[int, float]]:
    """ZeroQ's sensitivity for an activation quantizer: mean KL(FP output || output with only that quantizer on
    at b bits), its range the min-max of the tensor over the same images (every other quantizer off)."""
    from ..progress import counting

    dev = next((p.device for p in q.parameters()), images.device)
    batches = [x.to(dev) for x in images.split(batch_size)]
    out: dict[str, dict[int, float]] = {}
    with torch.inference_mode():
        ref = [F.log_softmax(q(x).float(), dim=1) for x in batches]
        with counting(progress, "sensitivity (activations, kl)", len(sites) * (len(candidates) + 1)) as advance:
            for name in sites:
                m = q.get_submodule(name)
                m.start_observing("minmax")
                for x in batches:
                    q(x)
                obs = m.observer
                advance(1)
                out[name] = {}
                for b in candidates:
                    m.bits = b
                    m.set_range(*obs.range(b, m.symmetric, signed=bool((obs.lo < 0).any())))
                    m.mode = "quant"
                    out[name][b] = _mean_kl(q, batches, ref, images.shape[0])
                    advance(1)
                m.observer = None
                m.mode = "off"
    return out


def _joint_options(wsens, asens, probe: ActProbe, pinned: dict[str, int]):
    """Per layer of the scope: its weight options ``{w: S}`` (one option, S 0, when pinned) and its input
    site (searched) or fixed input bits."""
    site_of = {n: st for st, ls in probe.sites.items() for n in ls}
    wopts = {n: (wsens[n] if n in wsens else {pinned[n]: 0.0}) for n in probe.scope}
    ains = {n: (site_of[n] if n in site_of else probe.fixed_a[n]) for n in probe.scope}
    return wopts, ains


def solve_joint(wopts: dict[str, dict[int, float]], ains: dict[str, str | int], asens: dict[str, dict[int, float]],
                macs: dict[str, int], cap: int) -> tuple[dict[str, int] | None, dict[str, int], float]:
    """Minimise ``sum_l S_l(w_l) + sum_s S_s(a_s)`` subject to ``sum_l MACs_l w_l a_{s(l)} <= cap``: one weight
    width per layer (``wopts``), one width per searched activation quantizer ``s`` (``asens``), a layer's input
    either a searched quantizer or fixed bits (``ains``). 0/1 variables ``y[l, w, a]`` (one per layer per
    pair) and ``z[s, a]``, ``sum_w y[l, w, a] = z[s(l), a]``: the BOPs row is linear in ``y``, the program exact
    (``scipy.optimize.milp``, zero gap). Returns (layer -> w, quantizer -> a, objective) or (None, {}, inf)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(wopts)
    sites = list(asens)
    ys = [(n, w, a) for n in names for w in sorted(wopts[n])
          for a in (sorted(asens[ains[n]]) if isinstance(ains[n], str) else [ains[n]])]
    zs = [(st, a) for st in sites for a in sorted(asens[st])]
    nv = len(ys) + len(zs)
    c = np.array([wopts[n][w] for n, w, _ in ys] + [asens[st][a] for st, a in zs], dtype=np.float64)
    c = c * (1e6 / c.max()) if c.max() > 0 else c  # as solve(): HiGHS's absolute gap against the largest term
    rows, lo, hi = [], [], []
    yi = {k: i for i, k in enumerate(ys)}
    for n in names:  # one pair per layer
        r = np.zeros(nv)
        for (m, w, a), i in yi.items():
            if m == n:
                r[i] = 1
        rows.append(r), lo.append(1), hi.append(1)
    for j, st in enumerate(sites):  # one width per quantizer
        r = np.zeros(nv)
        for k, (t, a) in enumerate(zs):
            if t == st:
                r[len(ys) + k] = 1
        rows.append(r), lo.append(1), hi.append(1)
    zi = {k: len(ys) + i for i, k in enumerate(zs)}
    for n in names:  # a layer's input width is its quantizer's
        if isinstance(ains[n], str):
            for a in sorted(asens[ains[n]]):
                r = np.zeros(nv)
                for w in wopts[n]:
                    r[yi[(n, w, a)]] = 1
                r[zi[(ains[n], a)]] = -1
                rows.append(r), lo.append(0), hi.append(0)
    cost = np.array([macs[n] * w * a for n, w, a in ys] + [0] * len(zs), dtype=np.float64)
    scale = max(float(cost.max()), 1.0)
    cons = [LinearConstraint(np.array(rows), np.array(lo, dtype=float), np.array(hi, dtype=float)),
            LinearConstraint((cost / scale)[None, :], -np.inf, cap / scale)]
    r = milp(c, constraints=cons, integrality=np.ones(nv), bounds=Bounds(0, 1),
             options={"mip_rel_gap": 0.0, "presolve": True})
    if r.x is None:
        return None, {}, math.inf
    x = np.round(r.x).astype(int)
    pairs = {n: (w, a) for (n, w, a), xi in zip(ys, x[:len(ys)]) if xi}
    abits = {st: a for (st, a), xi in zip(zs, x[len(ys):]) if xi}
    used = sum(macs[n] * w * a for n, (w, a) in pairs.items())
    if (len(pairs) != len(names) or len(abits) != len(sites) or used > cap
            or any(isinstance(ains[n], str) and abits[ains[n]] != a for n, (_, a) in pairs.items())):
        raise BadValueError("the bit allocation solver returned a point outside the budget; "
                            "try a slightly larger budget")
    obj = sum(wopts[n][w] for n, (w, _) in pairs.items()) + sum(asens[st][a] for st, a in abits.items())
    return {n: w for n, (w, _) in pairs.items()}, abits, float(obj)


def brute_force_joint(wopts, ains, asens, macs, cap):
    """Every joint allocation tried (tests: tiny models only); same return as :func:`solve_joint`."""
    names, sites = list(wopts), list(asens)
    best, val = (None, {}), math.inf
    for wc in itertools.product(*[sorted(wopts[n]) for n in names]):
        for ac in itertools.product(*[sorted(asens[st]) for st in sites]):
            ab = dict(zip(sites, ac))
            a_of = {n: (ab[ains[n]] if isinstance(ains[n], str) else ains[n]) for n in names}
            if sum(macs[n] * w * a_of[n] for n, w in zip(names, wc)) <= cap:
                v = sum(wopts[n][w] for n, w in zip(names, wc)) + sum(asens[st][a] for st, a in ab.items())
                if v < val:
                    best, val = (dict(zip(names, wc)), ab), v
    return best[0], best[1], val


def _bops_cap(cfg: MixedConfig) -> int:
    return math.floor(Fraction(str(cfg.bops_g)) * 10**9)


def _smallest_bops(wopts, ains, asens, macs) -> str:
    need = sum(macs[n] * min(wopts[n]) * (min(asens[ains[n]]) if isinstance(ains[n], str) else ains[n])
               for n in wopts)
    g = math.ceil(need / 1000) / 10**6  # G with 6 decimals, rounded up so that it is feasible
    return f"--bops {g:.6f} G ({need} bit-operations: every searched layer and input at its fewest bits)"


# -------------------------------------------------------------------------------------------------
# the search
# -------------------------------------------------------------------------------------------------
def _cache_key(q: nn.Module, protocol: Protocol, policy: LayerPolicy, cfg: MixedConfig, images, labels,
               seed: int, data: str) -> str:
    h = hashlib.sha256()
    for k, v in q.state_dict().items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and ".wq." not in k and ".aq_" not in k:
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps({"format": CACHE_FORMAT, "protocol": protocol.to_dict(), "keep_fp": list(policy.keep_fp),
                         "layer_bits": {k: list(v) for k, v in policy.layer_bits.items()},
                         "kind": cfg.sensitivity, "cands": list(cfg.candidates), "n": cfg.n_images,
                         "samples": cfg.samples if cfg.sensitivity == "hessian" else None,
                         "seed": seed if (cfg.sensitivity == "hessian" or data == "gaussian") else None,
                         "data": data}, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _read_cache(path):
    try:
        d = json.loads(path.read_text())
        if d.get("format") != CACHE_FORMAT:
            return None
        return {n: {int(b): float(s) for b, s in t.items()} for n, t in d["sensitivity"].items()}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None


def search(model: nn.Module, protocol: Protocol, cfg: MixedConfig, *, images: torch.Tensor | None = None,
           labels: torch.Tensor | None = None, policy: LayerPolicy | None = None, seed: int = 0,
           progress: bool = False, cache: bool = True, a_bits: int = 8) -> MixedResult:
    """Measure the sensitivities of ``model`` (FP; the pre-step already applied) and solve the
    allocation of ``cfg``'s budget. Raises :class:`InfeasibleBudgetError` (a one-line error naming the
    smallest feasible budget) when no allocation fits. ``a_bits``: the run's ``--a`` (``bops_g`` only: the
    bits of the activations the search does not choose)."""
    from ..paths import write_json_atomic, writing, zsq_cache

    policy = policy or LayerPolicy()
    t0, c0 = time.perf_counter(), time.process_time()
    q, searched, pinned = _probe_model(model, protocol, policy)
    if not searched:
        raise BadValueError(f"mixed precision: protocol {protocol.name} and the layer policy leave no layer to search")
    params = {n: m.weight.numel() for n, m in searched.items()}
    fixed = fixed_bytes(q, searched)
    probe = None
    if cfg.bops_g is not None:  # the activation side: which inputs are searched, every layer's MACs
        probe = _act_probe(model, protocol, policy, searched, pinned, a_bits)
        cap = _bops_cap(cfg)
        min_w = {n: {min(cfg.candidates): 0.0} for n in searched}
        min_a = {st: {min(cfg.act_candidates): 0.0} for st in probe.sites}
        wopts, ains = _joint_options(min_w, min_a, probe, pinned)
        if sum(probe.macs[n] * min(wopts[n]) * (min(min_a[ains[n]]) if isinstance(ains[n], str) else ains[n])
               for n in wopts) > cap:  # before measuring anything
            raise InfeasibleBudgetError(f"the budget {_budget_words(cfg)} is infeasible: the smallest feasible budget "
                                        f"is {_smallest_bops(wopts, ains, min_a, probe.macs)}")
    else:
        cost, cap, unit = _costs(cfg, params, fixed)
        if sum(min(c.values()) for c in cost.values()) > cap:  # before measuring anything
            raise InfeasibleBudgetError(f"the budget {_budget_words(cfg)} is infeasible: the smallest feasible budget "
                                        f"is {_smallest_budget(cfg, params, fixed)}")
    data = "synthetic"
    if images is None:
        data = "gaussian"
        info_size = _input_size(model)
        images = torch.randn(cfg.n_images, 3, info_size, info_size, generator=torch.Generator().manual_seed(seed))
        labels = None
    images = images[:cfg.n_images].float()
    labels = labels[:cfg.n_images] if labels is not None else None
    t1 = time.perf_counter()
    sens, cached, path = None, False, None
    if cache:
        key = _cache_key(q, protocol, policy, cfg, images, labels, seed, data)
        path = zsq_cache() / "mixed" / f"{cfg.sensitivity}-{key}.json"
        sens = _read_cache(path) if path.is_file() else None
        cached = sens is not None and set(sens) == set(searched)
        if not cached:
            sens = None
    if sens is None:
        if cfg.sensitivity == "kl":
            sens = kl_sensitivity(q, searched, images, cfg.candidates, batch_size=cfg.batch_size, progress=progress)
        else:
            sens = hessian_sensitivity(q, searched, images, labels, cfg.candidates, samples=cfg.samples,
                                       batch_size=cfg.batch_size, seed=seed, progress=progress)
        if path is not None:
            try:
                with writing(path):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(path, {"format": CACHE_FORMAT, "kind": cfg.sensitivity, "data": data,
                                             "sensitivity": {n: {str(b): s for b, s in t.items()}
                                                             for n, t in sens.items()}})
            except Exception as e:  # noqa: BLE001 - a cache that cannot be written only costs time
                warnings.warn(f"mixed precision: sensitivities not cached ({e})", stacklevel=2)
    acts = None
    if probe is not None:
        asens, acached = _act_sensitivities(probe, cfg, images, progress, path)
        t2 = time.perf_counter()
        wopts, ains = _joint_options(sens, asens, probe, pinned)
        bits, abits, obj = solve_joint(wopts, ains, asens, probe.macs, cap)
        if bits is None:
            raise InfeasibleBudgetError(f"the budget {_budget_words(cfg)} is infeasible: the smallest feasible budget "
                                        f"is {_smallest_bops(wopts, ains, asens, probe.macs)}")
        bits = {n: bits[n] for n in searched}
        acts = _act_result(model, protocol, policy, cfg, probe, bits, pinned, abits, asens, a_bits, cap, acached)
    else:
        t2 = time.perf_counter()
        bits, obj = solve(sens, cost, cap)
        if bits is None:
            raise InfeasibleBudgetError(f"the budget {_budget_words(cfg)} is infeasible: the smallest feasible budget "
                                        f"is {_smallest_budget(cfg, params, fixed)}")
    t3 = time.perf_counter()
    total = sum(params.values())
    avg = sum(params[n] * b for n, b in bits.items()) / total
    qbytes = fixed + sum(weight_bytes(params[n], b) for n, b in bits.items())
    return MixedResult(bits=bits, sensitivity=sens, params=params, objective=obj, wbits_avg=avg, q_bytes=qbytes,
                       pinned=pinned, data=data, cached=cached,
                       timing={"layout_s": t1 - t0, "sensitivity_s": t2 - t1, "solve_s": t3 - t2},
                       cpu_s=time.process_time() - c0, acts=acts)


def _act_sensitivities(probe: ActProbe, cfg: MixedConfig, images, progress, wpath):
    """The activation quantizers' KL sensitivities, cached beside the weights' (same key, plus the act
    candidates and the searched quantizers). Returns (table, cached)."""
    from ..paths import write_json_atomic, writing

    path = None
    if wpath is not None:
        h = hashlib.sha256(json.dumps({"w": wpath.name, "acands": list(cfg.act_candidates),
                                       "sites": sorted(probe.sites)}, sort_keys=True).encode()).hexdigest()[:24]
        path = wpath.parent / f"act-{h}.json"
        if path.is_file():
            t = _read_cache(path)
            if t is not None and set(t) == set(probe.sites):
                return t, True
    asens = kl_act_sensitivity(probe.q, list(probe.sites), images, cfg.act_candidates, batch_size=cfg.batch_size,
                               progress=progress)
    if path is not None:
        try:
            with writing(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, {"format": CACHE_FORMAT, "kind": "kl-act", "sensitivity":
                                         {n: {str(b): v for b, v in t.items()} for n, t in asens.items()}})
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written only costs time
            warnings.warn(f"mixed precision: activation sensitivities not cached ({e})", stacklevel=2)
    return asens, False


def _act_result(model, protocol, policy, cfg, probe: ActProbe, bits, pinned, abits, asens, a_bits, cap, cached):
    """The activation side of a ``bops_g`` result, checked on the model laid out with the chosen policy: every
    layer's weight bits and every searched quantizer's bits as solved, the BOPs within the budget."""
    from ..record import record_of
    from .protocol import apply_protocol

    searched_inputs = {n: abits[st] for st, ls in probe.sites.items() for n in ls}
    entries: dict = {n: (b, None) for n, b in bits.items()}
    for n, a in searched_inputs.items():
        entries[n] = (bits.get(n, pinned.get(n)), a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = apply_protocol(model, protocol, min(cfg.candidates), a_bits, policy=mixed_policy(policy, entries),
                           w_observer="minmax")
    lay = record_of(q).layout
    del q
    got_a = {a.name: a.bits for a in lay.acts}
    if any(lay.weights[n] != b for n, b in bits.items()) or any(got_a.get(st) != a for st, a in abits.items()):
        raise BadValueError("mixed precision: the laid-out model does not follow the searched bits "
                            "(an activation quantizer shared in a way the search did not see); use --wbits-avg or --size")

    def a_of(n):
        st = probe.layer_site.get(n)
        return got_a.get(st, UNQUANTIZED_A) if st is not None else UNQUANTIZED_A

    layer_bops = {n: probe.macs[n] * lay.weights[n] * a_of(n) for n in probe.scope}
    total = sum(layer_bops.values())
    if total > cap:
        raise BadValueError("mixed precision: the laid-out model's BOPs exceed the budget (a search bug); "
                            "please report it")
    model_bops = sum(probe.macs[n] * lay.weights.get(n, UNQUANTIZED_A) * a_of(n) for n in probe.macs)
    rec = {"act_sensitivity": "kl", "act_candidates": list(cfg.act_candidates),
           "abits": {n: a_of(n) for n in probe.scope},
           "act_bits": dict(abits),
           "act_sensitivities": {st: {str(b): v for b, v in t.items()} for st, t in asens.items()},
           "act_cached": cached,
           "bops": {"scope": BOPS_SCOPE, "budget_g": cfg.bops_g, "g": round(total / 1e9, 9), "bops": int(total),
                    "model_bops_g": round(model_bops / 1e9, 9),
                    "layers": {n: {"macs": probe.macs[n], "w": lay.weights[n], "a": a_of(n), "bops": int(layer_bops[n])}
                               for n in probe.scope}}}
    return {"searched_inputs": searched_inputs, "record": rec, "bops": total}


def _budget_words(cfg: MixedConfig) -> str:
    if cfg.bops_g is not None:
        return f"--bops {cfg.bops_g:g} G"
    return f"--wbits-avg {cfg.wbits_avg:g}" if cfg.wbits_avg is not None else f"--size {cfg.size_mb:g} MB"


def _input_size(model: nn.Module) -> int:
    from ..record import model_info

    info = model_info(model)
    return info.preprocess.input_size if info is not None else 32


def mixed_policy(policy: LayerPolicy | None, bits: dict) -> LayerPolicy:
    """``policy`` with the searched bits as weight-only ``layer_bits`` entries (``(w, None)``: the
    activation bits stay the protocol's), or ``(w, a)`` entries where ``bits`` gives a pair (``--bops``: the
    layer's input bits searched too). The user's own patterns come first and win."""
    policy = policy or LayerPolicy()
    lb = dict(policy.layer_bits)
    for name, b in bits.items():
        lb.setdefault(name, tuple(b) if isinstance(b, tuple) else (b, None))
    return LayerPolicy(tuple(policy.keep_fp), lb)


__all__ = ["MixedConfig", "MixedResult", "InfeasibleBudgetError", "search", "solve", "brute_force", "solve_joint",
           "brute_force_joint", "kl_act_sensitivity", "layer_inputs", "DEFAULT_ACT_CANDIDATES", "BOPS_SCOPE",
           "kl_sensitivity", "hessian_sensitivity", "hutchinson_traces", "mixed_policy", "SENSITIVITIES",
           "DEFAULT_CANDIDATES"]
