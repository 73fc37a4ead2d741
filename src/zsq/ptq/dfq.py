"""DFQ: Data-Free Quantization through Weight Equalization and Bias Correction (Nagel et al., ICCV 2019).

Three data-free steps (methods.md A.1):

* **Cross-layer equalization** (:func:`equalize`): for two layers ``A -> [BN] -> act -> B`` joined
  by a positively homogeneous activation (ReLU, LeakyReLU, PReLU), output channel ``i`` of ``A``
  is divided by ``s_i = sqrt(r1_i / r2_i)`` and input channel ``i`` of ``B`` multiplied by it, where ``r1_i``
  is the range of ``A``'s *BN-folded* row ``i`` and ``r2_i`` the range of ``B``'s column ``i``;
  both ranges become ``sqrt(r1_i r2_i)``. Iterated over all pairs until nothing changes.
  Depthwise-separable pairs (1x1 -> depthwise, depthwise -> 1x1) and grouped convolutions are
  handled (``B``'s column ``i`` is the slice of its group). **BatchNorm is kept**: when ``A`` is
  followed by a BN, the scale goes into the BN's ``weight`` and ``bias`` (the BN running
  statistics, which describe ``A``'s unchanged output, stay valid), so the network remains a
  normal FP model that synthesizers (ZeroQ, Genie) can still match BN statistics on: that is what
  lets ``--pre dfq`` run in front of any recipe. The FP function is unchanged. ReLU6 stops a pair
  unless ``relu6="replace"`` swaps it for ReLU, as the paper does for MobileNetV2; that is off by
  default: on EfficientNet-Lite0 the swap alone drops the FP model from 88.5 to 73.2 top-1 on the
  ImageNet sample, and ``zsq.load`` would rebuild the model with ReLU6. Pairs are checked
  numerically (:func:`validate_pairs`): a tensor also read outside a module (a residual add) is
  never rescaled.
* **High-bias absorption** (:func:`absorb_high_bias`): ``c_i = max(0, beta_i - 3 |gamma_i|)`` of the
  BN after ``A`` moves into ``B``'s bias (``b_B += W_B c``, ``beta_A -= c``); exact where the
  pre-activation stays above ``c`` (3 sigma) and ``B`` does not zero-pad. Pairs whose ``B`` pads
  are skipped unless ``absorb_padded=True`` (ResNet's 3x3 convs pad: at 8x8 feature maps 44 % of
  the outputs touch the border, where absorption changes the function).
* **Analytic bias correction** (:func:`bias_correct`): after the weights are quantized, each
  layer's expected output error ``E[W_q x_q] - E[W x]`` is removed from its bias; ``E[x]`` per
  input channel is the clipped-normal mean of the BN pre-activation through the activation
  (:mod:`zsq.ptq.bn_ranges`), optionally clipped at the range of the activation quantizer that
  reads it (``bc_act=True``: the expected shift caused by activation clipping is corrected too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import Config, setting
from ..quant.graph import WEIGHT_LAYERS, get_parent, trace
from ..quant.modules import QUANT_LAYERS, Quantizer
from ..record import model_info, record_of
from .bn_ranges import BNStats, expected_value, quantizer_bounds

HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
#: ``relu6`` values: a ReLU6 stops a pair (``skip``) or is replaced by a ReLU (``replace``)
RELU6_MODES = ("skip", "replace")
# parameter-free modules that commute with a positive per-channel scale (zero padding included)
_PASS = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.ZeroPad2d)
_PAD_NAMES = ("SamePad2d", "ZeroPad2d")


@dataclass
class DFQPreConfig(Config):
    """The ``dfq`` pre-step's settings (``--set``; the dfq recipe's values are in :mod:`zsq.catalogue.datafree`)."""

    cle: bool = True  # cross-layer equalization over the conv/linear pairs joined by a ReLU
    cle_iters: int = setting(100, minimum=0)  # CLE sweeps at most (it stops when every scale is within 1e-6 of 1)
    absorb: bool = True  # high-bias absorption into the next layer's bias
    absorb_sigma: float = 3.0  # absorb max(0, beta - absorb_sigma |gamma|) of each BN
    absorb_padded: bool = False  # absorb also into a layer whose input is zero-padded (not exact at the borders)
    relu6: str = setting("skip", choices=RELU6_MODES)  # skip: ReLU6 ends a pair; replace: ReLU6 -> ReLU (the paper)
    threads: int | None = setting(1, minimum=0)  # intra-op threads while it runs (0 / None: torch's count)


@dataclass
class Pair:
    """``a -> [bn] -> [act] -> b`` with nothing else reading the tensors in between."""

    a: str
    b: str
    bn: str | None = None
    act: str | None = None
    pads: bool = False  # zero padding between, or inside ``b``
    via: list[str] = field(default_factory=list)


def _example(model: nn.Module) -> torch.Tensor:
    info = model_info(model)
    size = info.preprocess.input_size if info is not None else 32
    return torch.zeros(1, 3, size, size, device=next((p.device for p in model.parameters()), torch.device("cpu")))


def _is_pass(m: nn.Module) -> bool:
    return isinstance(m, _PASS) or (type(m).__name__ in _PAD_NAMES and not any(True for _ in m.parameters()))


def find_pairs(model: nn.Module, example: torch.Tensor | None = None, relu6: str = "skip",
               validate: bool = True) -> list[Pair]:
    """Consecutive Conv/Linear pairs joined only through [BN], one homogeneous activation and
    pass-through modules, each intermediate tensor read by the next module only.
    ``relu6="replace"`` accepts ReLU6 (the caller replaces it by ReLU), ``"skip"`` stops at it.
    ``validate`` drops pairs whose rescaling changes the function (see :func:`validate_pairs`)."""
    example = _example(model) if example is None else example
    pairs = _candidate_pairs(model, example, relu6)
    return validate_pairs(model, pairs) if validate and pairs else pairs


@torch.no_grad()
def validate_pairs(model: nn.Module, pairs: list[Pair], rtol: float = 1e-4) -> list[Pair]:
    """Keep the pairs whose CLE rescaling (random positive scales) leaves the output unchanged.

    The module trace cannot see tensor operations outside modules (``x + inputs`` of a residual
    block), so a tensor that also feeds such an operation looks like a private link between two
    layers; rescaling it would change the network. One forward per pair on a copy (ReLU6 of the
    pairs replaced by ReLU, as CLE will do) catches every such case."""
    import copy

    m = copy.deepcopy(model).eval()
    replace_relu6(m, pairs)
    g = torch.Generator().manual_seed(0)
    ex = _example(model)
    x = torch.randn(2, *ex.shape[1:], generator=g).to(ex.device)  # drawn on the CPU: the same bits everywhere
    ref = m(x)
    tol = rtol * float(ref.abs().max()) + 1e-6
    keep = []
    for p in pairs:
        saved = {k: v.clone() for k, v in _pair_params(m, p).items()}
        a_out = saved["a.weight"].shape[0]
        s = torch.exp(torch.rand(a_out, generator=g) * 1.4 - 0.7).to(x.device)
        _rescale(m, p, s)
        if float((m(x) - ref).abs().max()) <= tol:
            keep.append(p)
        for k, v in _pair_params(m, p).items():
            v.copy_(saved[k])
    return keep


def _pair_params(m: nn.Module, p: Pair) -> dict[str, torch.Tensor]:
    a, b = m.get_submodule(p.a), m.get_submodule(p.b)
    out = {"a.weight": a.weight, "b.weight": b.weight}
    if a.bias is not None:
        out["a.bias"] = a.bias
    if p.bn:
        bn = m.get_submodule(p.bn)
        out["bn.weight"], out["bn.bias"] = bn.weight, bn.bias
    return out


def _candidate_pairs(model: nn.Module, example: torch.Tensor, relu6: str) -> list[Pair]:
    with no_inplace(model):
        tr = trace(model, example)
    ncalls: dict[str, int] = {}
    for c in tr.calls:
        ncalls[c.name] = ncalls.get(c.name, 0) + 1
    pairs, seen = [], set()
    acts = HOMOGENEOUS + ((nn.ReLU6,) if relu6 == "replace" else ())
    for c in tr.calls:
        if not isinstance(c.module, WEIGHT_LAYERS) or c.name in seen or ncalls[c.name] != 1 or c.output is None:
            continue
        seen.add(c.name)
        tid, bn, act, via, pads = c.output, None, None, [], False
        while True:
            # modules returning their input object (Identity, eval-mode Dropout) are no-ops here;
            # whatever reads their output reads this tensor and is caught by validate_pairs
            cons = [x for x in tr.consumers(tid) if x.output != tid]
            if len(cons) != 1 or ncalls[cons[0].name] != 1:
                break
            n = cons[0]
            if isinstance(n.module, WEIGHT_LAYERS):
                b = n.module
                a_out = c.module.out_channels if isinstance(c.module, nn.Conv2d) else c.module.out_features
                b_in = b.in_channels if isinstance(b, nn.Conv2d) else b.in_features
                if a_out == b_in:
                    if isinstance(b, nn.Conv2d) and any(p != 0 for p in _padding(b)):
                        pads = True
                    pairs.append(Pair(c.name, n.name, bn, act, pads, via))
                break
            if isinstance(n.module, nn.BatchNorm2d) and bn is None and act is None and not via:
                bn = n.name
            elif isinstance(n.module, acts) and act is None:
                act = n.name
            elif _is_pass(n.module):
                pads = pads or type(n.module).__name__ in _PAD_NAMES
                via.append(n.name)
            else:
                break
            if n.output is None:
                break
            tid = n.output
    return pairs


class no_inplace:
    """Context: in-place activations run out of place (so a trace sees their output as a new tensor)."""

    def __init__(self, model: nn.Module):
        self.mods = [m for m in model.modules() if getattr(m, "inplace", False) is True]

    def __enter__(self):
        for m in self.mods:
            m.inplace = False
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.inplace = True


def _padding(conv: nn.Conv2d) -> tuple[int, ...]:
    p = conv.padding
    if isinstance(p, str):
        return (0,) if p == "valid" else (1,)
    return tuple(p)


# -- per-channel views of weights -------------------------------------------------------------------

def _groups(m: nn.Module) -> int:
    return m.groups if isinstance(m, nn.Conv2d) else 1


def col_view(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``[C_in, C_out/groups * K]``: row ``i`` holds every weight that reads input channel ``i``."""
    cout, cpg = w.shape[0], w.shape[1]
    opg = cout // groups
    return w.reshape(groups, opg, cpg, -1).permute(0, 2, 1, 3).reshape(groups * cpg, -1)


def scale_cols_(w: torch.Tensor, s: torch.Tensor, groups: int) -> None:
    """In place: multiply every weight reading input channel ``i`` by ``s[i]``."""
    cout, cpg = w.shape[0], w.shape[1]
    v = w.view(groups, cout // groups, cpg, -1)
    v.mul_(s.reshape(groups, 1, cpg, 1).to(w.dtype))


def channel_matvec(w: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Per output channel ``o``: ``sum_{j,k} w[o, j, k] v[input channel of (o, j)]`` (a conv of a
    per-channel constant image, border effects ignored); ``w`` is Conv2d ``[O, I/g, kh, kw]`` or
    Linear ``[O, I]``."""
    cout, cpg = w.shape[0], w.shape[1]
    ws = w.reshape(cout, cpg, -1).sum(-1)  # [O, I/g]
    vv = v.to(ws.dtype).reshape(groups, 1, cpg)
    return (ws.view(groups, cout // groups, cpg) * vv).sum(-1).reshape(cout)


def _bn_gain(bn: nn.BatchNorm2d) -> torch.Tensor:
    g = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    return g / torch.sqrt(bn.running_var + bn.eps)


# -- cross-layer equalization ---------------------------------------------------------------------

def replace_relu6(model: nn.Module, pairs: list[Pair]) -> list[str]:
    """Replace the ReLU6 modules of ``pairs`` by ReLU (changes the function where inputs exceed 6)."""
    done = []
    for p in pairs:
        if p.act is None:
            continue
        m = model.get_submodule(p.act)
        if isinstance(m, nn.ReLU6):
            parent, attr = get_parent(model, p.act)
            setattr(parent, attr, nn.ReLU(inplace=False))
            done.append(p.act)
    return done


@torch.no_grad()
def equalize_pair(model: nn.Module, p: Pair, eps: float = 1e-8) -> torch.Tensor:
    """One CLE step on ``p``; returns the scales ``s`` applied."""
    a, b = model.get_submodule(p.a), model.get_submodule(p.b)
    wa = a.weight.reshape(a.weight.shape[0], -1)
    gain = _bn_gain(model.get_submodule(p.bn)) if p.bn else torch.ones(wa.shape[0], dtype=wa.dtype, device=wa.device)
    r1 = (wa * gain[:, None]).abs().amax(1)
    r2 = col_view(b.weight, _groups(b)).abs().amax(1)
    ok = (r1 > eps) & (r2 > eps)
    s = torch.where(ok, torch.sqrt(r1.clamp_min(eps) / r2.clamp_min(eps)), torch.ones_like(r1))
    _rescale(model, p, s)
    return s


@torch.no_grad()
def _rescale(model: nn.Module, p: Pair, s: torch.Tensor) -> None:
    """Divide output channel ``i`` of ``p.a`` (through its BN when there is one) by ``s[i]`` and
    multiply input channel ``i`` of ``p.b`` by it."""
    a, b = model.get_submodule(p.a), model.get_submodule(p.b)
    if p.bn:
        bn = model.get_submodule(p.bn)
        if not bn.affine:
            raise ValueError(f"{p.bn}: CLE through a BatchNorm without affine parameters is not supported")
        bn.weight.div_(s)
        bn.bias.div_(s)
    else:
        a.weight.div_(s.reshape(-1, *([1] * (a.weight.dim() - 1))))
        if a.bias is not None:
            a.bias.div_(s)
    scale_cols_(b.weight, s, _groups(b))


@torch.no_grad()
def equalize(model: nn.Module, pairs: list[Pair] | None = None, *, max_iter: int = 100, tol: float = 1e-6,
             relu6: str = "skip") -> dict:
    """Cross-layer equalization, iterated until every scale is within ``tol`` of 1. In place;
    returns a summary ``{pairs, iterations, replaced_relu6}``."""
    if pairs is None:
        pairs = find_pairs(model, relu6=relu6)
    replaced = replace_relu6(model, pairs) if relu6 == "replace" else []
    it = 0
    for it in range(1, max_iter + 1):
        worst = 0.0
        for p in pairs:
            s = equalize_pair(model, p)
            worst = max(worst, float((s.log().abs()).max()) if s.numel() else 0.0)
        if worst < tol:
            break
    return {"pairs": [(p.a, p.b) for p in pairs], "iterations": it, "replaced_relu6": replaced}


def pair_ranges(model: nn.Module, p: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r1, r2)``: per-channel ranges of A's BN-folded rows and of B's columns."""
    a, b = model.get_submodule(p.a), model.get_submodule(p.b)
    wa = a.weight.reshape(a.weight.shape[0], -1)
    gain = _bn_gain(model.get_submodule(p.bn)) if p.bn else torch.ones(wa.shape[0], device=wa.device)
    return (wa * gain[:, None]).abs().amax(1).detach(), col_view(b.weight, _groups(b)).abs().amax(1).detach()


@torch.no_grad()
def absorb_high_bias(model: nn.Module, pairs: list[Pair], n_sigma: float = 3.0, absorb_padded: bool = False
                     ) -> int:
    """Move ``c = max(0, beta - n_sigma |gamma|)`` from A's BN into B's bias (see module doc).
    Returns the number of pairs changed."""
    from .bn_ranges import bn_after_layers

    changed = 0
    with no_inplace(model):
        bn_after = bn_after_layers(trace(model, _example(model)))
    for p in pairs:
        if p.bn is None or p.act is None or (p.pads and not absorb_padded):
            continue
        act = model.get_submodule(p.act)
        if not isinstance(act, (nn.ReLU, nn.LeakyReLU)):
            continue
        bn, b = model.get_submodule(p.bn), model.get_submodule(p.b)
        c = (bn.bias - n_sigma * bn.weight.abs()).clamp_min(0)
        if not bool((c > 0).any()):
            continue
        bn.bias.sub_(c)
        shift = channel_matvec(b.weight, c, _groups(b))
        add_output_shift_(b, shift, model.get_submodule(bn_after[p.b]) if p.b in bn_after else None)
        changed += 1
    return changed


@torch.no_grad()
def add_output_shift_(layer: nn.Module, shift: torch.Tensor, bn: nn.Module | None = None) -> None:
    """``layer``'s output += ``shift`` (per channel): into its bias, or, when it has none and a
    BatchNorm reads its output alone, into that BN's running mean (``BN(y + d)`` is ``BN`` with
    mean ``mu - d``) so that the model keeps its parameter names (``zsq.load`` rebuilds the
    architecture and loads the state dict); a new bias only as a last resort."""
    if layer.bias is not None:
        layer.bias.add_(shift.to(layer.bias.dtype))
    elif isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
        bn.running_mean.sub_(shift.to(bn.running_mean.dtype))
    else:
        layer.bias = nn.Parameter(shift.clone())


def dfq_prestep(model: nn.Module, hparams: dict | DFQPreConfig) -> nn.Module:
    """The ``dfq`` pre-step: CLE (+ high-bias absorption) on an FP model, BatchNorm kept. ``hparams``: a
    :class:`DFQPreConfig` or a recipe's hparams (its keys that are not the pre-step's are ignored)."""
    from .bn_ranges import require_batchnorm

    cfg = hparams if isinstance(hparams, DFQPreConfig) else DFQPreConfig.from_hparams(hparams)
    require_batchnorm(model, "the dfq pre-step")
    model.eval()
    pairs = find_pairs(model, relu6=cfg.relu6)
    info = {"cle": None, "absorbed": 0}
    if cfg.cle:
        info["cle"] = equalize(model, pairs, max_iter=cfg.cle_iters, relu6=cfg.relu6)
    if cfg.absorb:
        info["absorbed"] = absorb_high_bias(model, pairs, cfg.absorb_sigma, cfg.absorb_padded)
    record_of(model).methods["dfq"] = info
    return model


# -- bias correction --------------------------------------------------------------------------------

def layer_input_quantizer(qmodel: nn.Module, stats: BNStats, layer: str) -> Quantizer | None:
    """The activation quantizer that the input of ``layer`` passes through (``aq_in`` or the
    producing module's ``aq_out``), or ``None``."""
    m = qmodel.get_submodule(layer)
    if getattr(m, "aq_in", None) is not None:
        return m.aq_in
    prod = stats.input_producer.get(layer)
    if prod is not None:
        pm = qmodel.get_submodule(prod)
        q = getattr(pm, "aq_out", None)
        if isinstance(q, Quantizer) and q.mode == "quant":
            return q
    return None


def input_expectations(qmodel: nn.Module, stats: BNStats, layer: str, act_aware: bool
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(E[x_q], E[x])`` per input channel of ``layer``: the quantized input (clipped at its
    quantizer's range when ``act_aware``) and the FP one."""
    if layer not in stats.layer_inputs:
        return None
    tm = stats.layer_input_model(layer)
    e_fp = expected_value(tm)
    e_q = e_fp
    if act_aware:
        q = layer_input_quantizer(qmodel, stats, layer)
        if q is not None:
            lo, hi = quantizer_bounds(q)
            e_q = expected_value(tm, lo, hi)
    return e_q, e_fp


@torch.no_grad()
def correct_layer_bias(layer: nn.Module, w_ref: torch.Tensor, e_q: torch.Tensor, e_ref: torch.Tensor,
                       bn: nn.Module | None = None) -> torch.Tensor:
    """``bias -= W_q E[x_q] - W_ref E[x_ref]`` (per output channel; into ``bn``'s running mean when
    the layer has no bias, see :func:`add_output_shift_`); returns the correction."""
    g = _groups(layer)
    wq = layer.qweight().detach() if isinstance(layer, QUANT_LAYERS) else layer.weight.detach()
    delta = channel_matvec(wq, e_q, g) - channel_matvec(w_ref, e_ref, g)
    add_output_shift_(layer, -delta, bn)
    return delta


def following_bn(qmodel: nn.Module, stats: BNStats, layer: str) -> nn.Module | None:
    """The BatchNorm that reads ``layer``'s output alone in ``qmodel`` (``None`` once folded)."""
    name = stats.bn_after.get(layer)
    if name is None:
        return None
    m = qmodel.get_submodule(name)
    return m if isinstance(m, nn.modules.batchnorm._BatchNorm) else None


@torch.no_grad()
def bias_correct(qmodel: nn.Module, stats: BNStats, fp_weights: dict[str, torch.Tensor] | None = None,
                 act_aware: bool = False, skip: set[str] | None = None) -> dict[str, float]:
    """DFQ's analytic bias correction on every quantized layer of ``qmodel``. ``fp_weights``:
    the reference (FP) weights when the layer's ``weight`` was overwritten by a rounding step;
    else the layer's own ``weight`` is the reference. Returns ``{layer: mean |correction|}``."""
    out = {}
    for name, m in qmodel.named_modules():
        if not isinstance(m, QUANT_LAYERS) or (skip and name in skip):
            continue
        ex = input_expectations(qmodel, stats, name, act_aware)
        if ex is None:
            continue
        w_ref = (fp_weights or {}).get(name, m.weight.detach())
        d = correct_layer_bias(m, w_ref, ex[0], ex[1], following_bn(qmodel, stats, name))
        out[name] = float(d.abs().mean())
    return out
