"""A light data-flow trace: run the model once with hooks and record which module produced and
which modules consumed each tensor. Quantizer placement and BN folding read this trace, so they work
on any model whose activations and blocks are modules, without rewriting ``forward``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.SiLU, nn.GELU, nn.ELU, nn.Mish,
               nn.PReLU, nn.Softplus)
BLOCK_NAME = re.compile(r"(Block|Bottleneck|InvertedResidual|MBConv|ResUnit)", re.IGNORECASE)
WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
# layers with parameters that zsq leaves FP without comment (normalisation is folded or kept FP)
_FP_OK = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


@dataclass
class Call:
    name: str
    module: nn.Module
    order: int  # position among finished calls (children finish before their parents)
    inputs: list[int]
    output: int | None


@dataclass
class Trace:
    calls: list[Call] = field(default_factory=list)
    producer: dict[int, Call] = field(default_factory=dict)  # tensor id -> innermost module that made it
    keep: list = field(default_factory=list)  # keeps tensors alive so ids stay unique

    def leaf_calls(self) -> list[Call]:
        return [c for c in self.calls if not list(c.module.children()) or isinstance(c.module, WEIGHT_LAYERS)]

    def consumers(self, tid: int) -> list[Call]:
        return [c for c in self.leaf_calls() if tid in c.inputs]


def is_block(m: nn.Module) -> bool:
    return bool(BLOCK_NAME.search(type(m).__name__)) and not isinstance(m, nn.Sequential)


@torch.no_grad()
def trace(model: nn.Module, example: torch.Tensor) -> Trace:
    tr = Trace()
    handles = []

    def hook(name):
        def fn(mod, args, out):
            ins = [id(a) for a in args if isinstance(a, torch.Tensor)]
            oid = id(out) if isinstance(out, torch.Tensor) else None
            call = Call(name, mod, len(tr.calls), ins, oid)
            tr.calls.append(call)
            tr.keep.append((args, out))
            if oid is not None and oid not in tr.producer:
                tr.producer[oid] = call

        return fn

    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_hook(hook(name)))
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return tr


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    parent = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
    return parent, parts[-1]


def unsupported_layers(model: nn.Module) -> list[str]:
    """Leaf modules with weights that zsq cannot quantize (they stay FP)."""
    out = []
    for name, m in model.named_modules():
        if list(m.children()) or isinstance(m, WEIGHT_LAYERS + _FP_OK):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            out.append(f"{name} ({type(m).__name__})")
    return out
