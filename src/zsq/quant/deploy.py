"""Activation-quantizer placement of the ``deploy`` protocol: the tensors ONNX Runtime's integer
kernels read and write (see :func:`deploy_sites`).

ONNX Runtime's QDQ transformers turn ``DQ -> Conv/Gemm/MatMul -> [Relu/Clip ->] Q`` into
``QLinearConv`` / ``QGemm`` / ``QLinearMatMul``, ``DQ, DQ -> Add -> Q`` into ``QLinearAdd`` and
``DQ -> (Global)AveragePool -> Q`` into ``QLinearAveragePool``. So every tensor that enters or leaves
such an op needs a quantizer: the input of every Conv/Linear (the network input included), the output
of every Conv/Linear (after its ReLU/ReLU6 when one follows: ORT folds the activation into the
quantized output's range), every residual block output (the Add), the output of every pooling and of
every parameter-free module inside a block (the option-A shortcut), and the output of every other
activation function. The logits stay float (ORT's ``QGemm`` / ``MatMulIntegerToFloat`` write float).
"""

from __future__ import annotations

from torch import nn

from .graph import ACTIVATIONS, WEIGHT_LAYERS, is_block

# activations ORT fuses into the quantized output of the Conv/Gemm before them (Relu, Clip)
FUSED_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
# modules whose output holds the same values as their input (zero padding adds exact zeros): a layer's
# input quantizer sits before them, so the padding folds into the convolution
_SAME_VALUES = (nn.Identity, nn.Dropout, nn.Flatten, nn.ZeroPad2d)


def _same_values(m: nn.Module) -> bool:
    """Identity, dropout, flatten and zero padding (``nn.ZeroPad2d``, EfficientNet-Lite's TF "SAME"
    ``SamePad2d``, or any module with a true ``zsq_zero_pad`` attribute)."""
    return (isinstance(m, _SAME_VALUES) or type(m).__name__ == "SamePad2d"
            or bool(getattr(m, "zsq_zero_pad", False)))


def deploy_sites(tr, layers, a_bits: int, protocol, policy, input_range=None, folded=()) -> dict[int, dict]:
    """Tensor id -> ``{"owner": call or None, "bits": int, "layer_in": name or None}`` for ``deploy``.

    ``layers``: the first call of every Conv/Linear in call order. ``owner`` is the call whose output
    is quantized (a forward hook); ``layer_in`` names the layer whose input quantizer (``aq_in``) holds
    a tensor no module produced (the network input, a flattened feature map). ``input_range``: the
    network input's (lo, hi), known from the preprocessing (:func:`input_range`); its quantizer keeps
    that range whatever a calibration observes (``"fixed_range"``). ``folded``: the (conv, BN) pairs
    folded before the trace.
    """
    sites: dict[int, dict] = {}
    network_input = tr.calls[0].inputs[0] if tr.calls and tr.calls[0].inputs else None
    last_order = layers[-1].order
    first_name, last_name = layers[0].name, layers[-1].name

    # a conv's output is owned by its folded BN (an Identity returning the same tensor), so that ranges
    # from BN statistics read the BN's output
    calls = {c.name: c for c in tr.calls}
    bn_of = {conv: bn for conv, bn in folded}

    def owner_of(tid):
        p = tr.producer.get(tid)
        if p is not None and p.name in bn_of and bn_of[p.name] in calls and calls[bn_of[p.name]].output == tid:
            return calls[bn_of[p.name]]
        return p

    def add(tid, bits):
        owner = owner_of(tid)
        if owner is not None:
            s = sites.setdefault(tid, {"owner": owner, "bits": bits, "layer_in": None})
            s["bits"] = max(s["bits"], bits)

    # (a) the input of every quantized Conv/Linear, read before padding / dropout / flatten
    for c in layers:
        if policy.is_fp(c.name) or not c.inputs:
            continue
        bits = 8 if ((c.name == first_name and protocol.first_a8) or (c.name == last_name and protocol.last_a8)) \
            else a_bits
        if (ov := policy.bits_for(c.name)) is not None and ov[1] is not None:
            bits = ov[1]
        tid = c.inputs[0]
        while (p := tr.producer.get(tid)) is not None and _same_values(p.module) and p.inputs:
            if p.inputs[0] == tid:  # a module returning its input (Identity, Dropout in eval)
                break
            tid = p.inputs[0]
        p = tr.producer.get(tid)
        if p is None or (_same_values(p.module) and p.inputs and p.inputs[0] == tid):
            # no module made it (the network input, a flattened feature map): the layer's own input quantizer
            s = sites.setdefault(c.inputs[0], {"owner": None, "bits": bits, "layer_in": c.name})
            s["bits"] = max(s["bits"], bits)
            if tid == network_input and input_range is not None:
                s["fixed_range"] = input_range
        else:
            add(tid, bits)
    # (b) the output of every Conv/Linear but the last (the logits), after its ReLU / ReLU6
    for i, c in enumerate(layers[:-1]):
        if c.output is None:
            continue
        acts = [k for k in tr.consumers(c.output) if isinstance(k.module, FUSED_ACTS)]
        tid = acts[0].output if len(acts) == 1 and acts[0].output is not None else c.output
        add(tid, 8 if (i == 0 and protocol.first_a8) else a_bits)
    # (c) every other activation's output and every block output (the residual Add)
    for c in tr.calls:
        if c.output is not None and c.order < last_order and (isinstance(c.module, ACTIVATIONS) or is_block(c.module)):
            add(c.output, a_bits)
    # (d) pooling, and parameter-free modules inside blocks (shortcuts), reading a quantized tensor
    block_names = [c.name for c in tr.calls if is_block(c.module)]
    for c in tr.calls:
        if c.output is None or c.order >= last_order or not c.inputs or c.inputs[0] not in sites:
            continue
        m = c.module
        if isinstance(m, POOLS) or (
                not list(m.children()) and not any(True for _ in m.parameters(recurse=False))
                and not isinstance(m, ACTIVATIONS + WEIGHT_LAYERS) and not _same_values(m)
                and any(c.name.startswith(b + ".") for b in block_names)):
            add(c.output, sites[c.inputs[0]]["bits"])
    # the classifier's input side at 8 bits (as fixed / ptq): the last site before the last layer
    if protocol.last_a8:
        before = [s for s in sites.values() if s["owner"] is not None and s["owner"].order < last_order]
        if before:
            max(before, key=lambda s: s["owner"].order)["bits"] = 8
    return sites


def input_range(model: nn.Module) -> tuple[float, float] | None:
    """The (lo, hi) of the network input: pixels in [0, 1] normalised by the model's mean / std
    (no data needed); ``None`` when the model carries no preprocessing."""
    from ..record import model_info

    pre = getattr(model_info(model), "preprocess", None)
    mean, std = getattr(pre, "mean", None), getattr(pre, "std", None)
    if not mean or not std:
        return None
    lo = min((0.0 - m) / s for m, s in zip(mean, std))
    hi = max((1.0 - m) / s for m, s in zip(mean, std))
    return float(lo), float(hi)
