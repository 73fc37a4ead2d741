"""Apply a :class:`~zsq.spec.Protocol` to a model: fold BN, swap Conv2d/Linear for quantized
layers, and place activation quantizers where the protocol says (see benchmarks.md's table).
Matmuls between two activations written as :class:`zsq.ops.MatMul` modules (a ViT's
``q @ k^T`` and ``attn @ v``) become :class:`QuantMatMul` with both operands quantized at A bits
under every protocol (``--keep-fp`` / ``--layer-bits`` accept their names too).

The result is the same ``nn.Module`` tree (names unchanged, so blocks can be reconstructed one by
one), with the ``layout`` of its record (:func:`zsq.record.record_of`) describing every quantized tensor.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import BadValueError, UnsupportedLayerError
from ..ops import MatMul
from ..record import model_info, record_of
from ..spec import LayerPolicy, Protocol, check_bits
from .fold import fold_bn
from .graph import ACTIVATIONS, WEIGHT_LAYERS, get_parent, is_block, trace, unsupported_layers
from .modules import QuantConv2d, QuantLinear, QuantMatMul, Quantizer


@dataclass
class ActSite:
    name: str  # quantizer's module name, e.g. "layer1.0.relu1.aq_out" or "linear.aq_in"
    bits: int
    where: str  # "out" (after a module) or "in" (at a layer's input)


@dataclass
class Layout:
    protocol: str
    w_bits: int
    a_bits: int
    weights: dict[str, int] = field(default_factory=dict)  # layer name -> weight bits
    acts: list[ActSite] = field(default_factory=list)
    fp_layers: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self):
        return {"protocol": self.protocol, "weights": self.weights,
                "acts": {a.name: a.bits for a in self.acts}, "fp_layers": self.fp_layers,
                "unsupported": self.unsupported, "folded_bn": [list(p) for p in self.folded]}


def _output_hook(mod, args, out):
    return mod.aq_out(out)


def attach_output_quantizer(module: nn.Module, q: Quantizer) -> None:
    """Quantize ``module``'s output: the quantizer is its child ``aq_out`` applied by a forward hook."""
    module.aq_out = q
    if not getattr(module, "_zsq_out_hooked", False):
        module.register_forward_hook(_output_hook)
        module._zsq_out_hooked = True


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """Seeded Gaussian images of the model's input size, drawn on the CPU (the same bits on every device)
    and put on the device (and floating dtype) of the model's parameters."""
    info = model_info(model)
    size = info.preprocess.input_size if info is not None else 32
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return like_model(x, model)


def like_model(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``x`` on the device of ``model``'s first parameter, in its dtype when that is floating (unchanged for a
    CPU fp32 model, and for a model without parameters)."""
    p = next(model.parameters(), None)
    if p is None:
        return x
    return x.to(device=p.device, dtype=p.dtype if p.is_floating_point() and x.is_floating_point() else x.dtype)


def apply_protocol(
    model: nn.Module,
    protocol: Protocol,
    w_bits: int,
    a_bits: int,
    *,
    policy: LayerPolicy | None = None,
    w_observer: str = "minmax",
    a_observer: str = "minmax",
    strict: bool = False,
    example: torch.Tensor | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Return a fake-quantized copy of ``model`` laid out by ``protocol``.

    Weight quantizers are initialised from the weights (``w_observer``); activation quantizers are
    created in ``observe``-ready state and need :func:`zsq.ptq.calibrate.calibrate` (or training).
    """
    w_bits, a_bits = check_bits(w_bits, "--w"), check_bits(a_bits, "--a")
    policy = policy or LayerPolicy()
    q = model if inplace else copy.deepcopy(model)
    q.eval()
    device = next((p.device for p in q.parameters()), torch.device("cpu"))  # new quantizers go there
    if example is None:
        example = example_input(q)
    unsupported = unsupported_layers(q)
    if unsupported:
        msg = f"unsupported layers stay FP: {', '.join(unsupported)}"
        if strict:
            raise UnsupportedLayerError(msg + " (--strict)")
        warnings.warn(msg, stacklevel=2)
    folded = fold_bn(q, example) if protocol.fold_bn else []

    tr = trace(q, example)
    layers = _first_calls(tr, WEIGHT_LAYERS)
    matmuls = _first_calls(tr, MatMul)
    if not layers:
        raise BadValueError("the model has no Conv2d/Linear layer to quantize")
    names = [c.name for c in layers]
    bad = policy.unmatched(names + [c.name for c in matmuls])
    if bad:
        raise BadValueError(f"--keep-fp/--layer-bits pattern(s) match no layer: {', '.join(bad)} "
                            f"(layers are e.g. {', '.join(names[:3])})")
    first, last = names[0], names[-1]
    layout = Layout(protocol.name, w_bits, a_bits, unsupported=unsupported, folded=folded)

    # 1. weights
    for name in names:
        if policy.is_fp(name):
            layout.fp_layers.append(name)
            continue
        wb = w_bits
        if (name == first and protocol.first_w8) or (name == last and protocol.last_w8):
            wb = 8
        if (ov := policy.bits_for(name)) is not None:
            wb = ov[0]
        m = q.get_submodule(name)
        cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        qm = cls.from_float(m, wb, w_observer, per_channel=protocol.w_per_channel, symmetric=protocol.w_symmetric)
        parent, attr = get_parent(q, name)
        setattr(parent, attr, qm)
        layout.weights[name] = wb

    # 2. activation sites: tensor id -> (owner call or consuming layer, bits)
    first_order = layers[0].order
    last_order = layers[-1].order
    sites: dict[int, dict] = {}
    if protocol.act_placement == "output":
        cands = [c for c in tr.calls if c.output is not None and first_order < c.order < last_order
                 and (isinstance(c.module, ACTIVATIONS) or is_block(c.module))]
        for c in cands:
            if c.output not in sites:
                sites[c.output] = {"owner": tr.producer[c.output], "bits": a_bits, "layer_in": None}
        ordered = sorted(sites.values(), key=lambda s: s["owner"].order)
        if ordered and protocol.first_a8:
            ordered[0]["bits"] = 8
        if ordered and protocol.last_a8:
            ordered[-1]["bits"] = 8
        # --layer-bits A applies to the site holding the layer's input
        for c in layers:
            if (ov := policy.bits_for(c.name)) is not None and ov[1] is not None:
                for tid in c.inputs:
                    if tid in sites:
                        sites[tid]["bits"] = ov[1]
    elif protocol.act_placement == "input":
        for i, c in enumerate(layers):
            if i == 0 or policy.is_fp(c.name) or not c.inputs:
                continue
            tid = c.inputs[0]
            bits = 8 if ((i == 1 and protocol.first_a8) or (c.name == last and protocol.last_a8)) else a_bits
            if (ov := policy.bits_for(c.name)) is not None and ov[1] is not None:
                bits = ov[1]
            prod = tr.producer.get(tid)
            if prod is not None and not isinstance(prod.module, WEIGHT_LAYERS) and prod.order > first_order:
                s = sites.setdefault(tid, {"owner": prod, "bits": bits, "layer_in": None})
                s["bits"] = max(s["bits"], bits)
            else:
                sites[tid] = {"owner": None, "bits": bits, "layer_in": c.name}
    elif protocol.act_placement == "deploy":
        from .deploy import deploy_sites

        from .deploy import input_range

        sites = deploy_sites(tr, layers, a_bits, protocol, policy, input_range(q), folded)
    else:
        raise BadValueError(f"unknown act_placement '{protocol.act_placement}'")

    for s in sorted(sites.values(), key=lambda s: s["owner"].order if s["owner"] else -1):
        aq = Quantizer(s["bits"], symmetric=False, per_channel=False, observer=a_observer).to(device)
        aq.mode = "observe"
        if s.get("fixed_range") is not None:  # deploy: the network input's range is the preprocessing's
            aq.fixed_range = s["fixed_range"]
        if s["owner"] is not None:
            attach_output_quantizer(q.get_submodule(s["owner"].name), aq)
            layout.acts.append(ActSite(f"{s['owner'].name}.aq_out", s["bits"], "out"))
        else:
            layer = q.get_submodule(s["layer_in"])
            layer.aq_in = aq
            layout.acts.append(ActSite(f"{s['layer_in']}.aq_in", s["bits"], "in"))

    # 3. matmuls between activations: both operands at A (their own quantizers)
    for c in matmuls:
        if policy.is_fp(c.name):
            layout.fp_layers.append(c.name)
            continue
        bits = ov[1] if (ov := policy.bits_for(c.name)) is not None and ov[1] is not None else a_bits
        pair = []
        for _ in range(2):
            aq = Quantizer(bits, symmetric=False, per_channel=False, observer=a_observer).to(device)
            aq.mode = "observe"
            pair.append(aq)
        parent, attr = get_parent(q, c.name)
        setattr(parent, attr, QuantMatMul(*pair))
        layout.acts += [ActSite(f"{c.name}.aq_a", bits, "in"), ActSite(f"{c.name}.aq_b", bits, "in")]
    # the layout lists activation quantizers in forward order
    when = {f"{c.name}.aq_in": c.order for c in layers}
    when |= {f"{c.name}.aq_{ab}": c.order for c in matmuls for ab in "ab"}
    when |= {f"{s['owner'].name}.aq_out": s["owner"].order for s in sites.values() if s["owner"] is not None}
    layout.acts.sort(key=lambda a: when[a.name])
    record_of(q).layout = layout
    return q


def _first_calls(tr, types) -> list:
    """The first call of every module of ``types``, in call order (a module called twice is quantized once)."""
    seen, out = set(), []
    for c in tr.calls:
        if isinstance(c.module, types) and c.name not in seen:
            seen.add(c.name)
            out.append(c)
    return out


def set_act_mode(model: nn.Module, mode: str) -> None:
    for name, m in model.named_modules():
        if isinstance(m, Quantizer) and not name.endswith("wq"):
            m.mode = mode


def frozen_fp_copy(model: nn.Module) -> nn.Module:
    """A copy of a laid-out model with every :class:`Quantizer` off, no gradients, eval mode: the FP
    teacher with the same structure (folded BN or not) that reconstruction and QAT distil from."""
    teacher = copy.deepcopy(model)
    for m in teacher.modules():
        if isinstance(m, Quantizer):
            m.mode = "off"
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
