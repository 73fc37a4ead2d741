"""The parts of block reconstruction (:mod:`zsq.ptq.reconstruct`) that say what runs: one pass's
hyperparameters (:class:`ReconConfig`), the units a model is cut into (:func:`find_units`) and the
activation quantizers each owns, and the passes of each method (:func:`method_passes`).

**Which activation quantizers a unit owns.** A quantizer inside the unit whose output stays inside
is the unit's. A quantizer on a unit boundary belongs, in ``output`` layouts (``ptq``, BRECQ: the
quantizer sits at the producer's output), to the unit that produces the tensor, and in ``input``
layouts (``genie-native``: the quantizer sits at the consumer's input, shared by the residual
shortcut) to the unit that consumes it; with no such unit, to the other one. A quantizer owned by
the consumer but attached outside it (the previous block's output hook) is applied by the engine at
the unit's input, so ``x_q`` is taken before it, as in Genie's code. Quantizers owned by no unit are
range-calibrated (sequentially) when the forward reaches them. Until its owner starts, a quantizer is
``off`` (the later part of the network is FP while earlier units are reconstructed, as in Genie).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import Config, setting
from ..errors import BadValueError
from ..quant.graph import is_block
from ..quant.modules import QUANT_LAYERS, Quantizer
from ..quant.observers import OBSERVERS

#: the values of ReconConfig's string fields
GRANULARITIES = ("block", "layer")
W_SCALE_PARAMS = ("absolute", "relative")
PRECISIONS = ("fp32", "bf16")


@dataclass
class ReconConfig(Config):
    """One reconstruction pass over every unit. Defaults = Genie-M [code: SamsungLabs/Genie reconstruct.py].

    ``iters``: optimisation steps per unit, ``batch_size`` images per step.
    ``learn_weights``: AdaRound the weights (``lr_round`` Adam on the rounding logits,
    ``round_weight`` times the regulariser, ``b_range`` annealed after ``warmup`` x iters).
    ``lr_w_scale``: Adam lr of the weight steps (cosine to 0; 0 = fixed step, AdaRound/BRECQ/QDrop);
    ``w_scale_param``: ``absolute`` (Genie's code: Adam on the step itself) or ``relative`` (Adam on
    ``log(s / s_0)``: the lr is a fraction of each channel's step; see :mod:`zsq.quant.adaround`).
    ``act_quant``: activation quantizers active in this pass; ``lr_a_scale``: their LSQ Adam lr
    (cosine to 0; 0 = ranges calibrated, not learnt).
    ``drop_prob``: QDrop inside the owned activation quantizers; ``input_mix``: probability that an
    element of the unit's input comes from ``x_q`` rather than ``x`` (QDrop 0.5; 1 = quantized input
    only, BRECQ).
    ``granularity``: ``block`` (residual blocks, lone layers elsewhere) or ``layer``.
    ``skip_first``: leave the first layer out of reconstruction (BRECQ/``ptq`` convention).
    ``precision``: ``fp32`` | ``bf16`` (autocast of the unit forward during optimisation);
    ``channels_last``: NHWC memory format for the cached tensors and the unit.
    A skipped unit (``skip_first``, or not in the engine's ``only``) learns nothing: its weights keep
    their initial grid and its activation quantizers are only range-initialised.
    """

    iters: int = setting(20000, minimum=0)
    batch_size: int = setting(32, minimum=1)
    learn_weights: bool = True
    round_weight: float = 1.0
    b_range: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    lr_round: float = 1e-3
    lr_w_scale: float = 1e-4
    w_scale_param: str = setting("absolute", choices=W_SCALE_PARAMS)
    act_quant: bool = True
    lr_a_scale: float = 4e-5
    drop_prob: float = 0.5
    input_mix: float = 0.5
    granularity: str = setting("block", choices=GRANULARITIES)
    skip_first: bool = False
    a_observer: str = setting("mse", choices=OBSERVERS)
    a_init_images: int = setting(32, minimum=1)  # Genie initialises each quantizer on its first batch of 32
    precision: str = setting("fp32", choices=PRECISIONS)
    channels_last: bool = False
    cache_batch: int = setting(256, minimum=1)

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise BadValueError(f"granularity must be block or layer, got '{self.granularity}'")
        if self.w_scale_param not in W_SCALE_PARAMS:
            raise BadValueError(f"w_scale_param must be absolute or relative, got '{self.w_scale_param}'")
        if self.precision not in PRECISIONS:
            raise BadValueError(f"precision must be fp32 or bf16, got '{self.precision}'")
        if int(self.iters) < 0 or int(self.batch_size) < 1:
            raise BadValueError(f"iters must be >= 0 and batch_size >= 1, got {self.iters}, {self.batch_size}")
        self.b_range = tuple(float(b) for b in self.b_range)


@dataclass
class BrecqActConfig(Config):
    """BRECQ's second pass, the activation steps [code: yhhhli/BRECQ main_imagenet.py]: LSQ steps learnt
    with Adam at ``lr_a`` for ``iters_a`` iterations per block (the ``brecq`` quantizer's hparams)."""

    lr_a: float = 4e-4  # --lr 4e-4 (activation step learning rate)
    iters_a: int = setting(5000, minimum=0)  # --iters_a 5000 (per block)


# --------------------------------------------------------------------------------------------------
# units and ownership
# --------------------------------------------------------------------------------------------------
@dataclass
class Unit:
    name: str
    module: nn.Module
    layers: list[tuple[str, nn.Module]]  # quantized layers inside (name relative to the model)
    owned: list[tuple[str, Quantizer]] = field(default_factory=list)  # activation quantizers, forward order
    inputs: list[tuple[str, Quantizer]] = field(default_factory=list)  # owned, applied at the unit input
    skip: bool = False


def _act_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer) and not n.endswith("wq")]


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def find_units(model: nn.Module, example: torch.Tensor, granularity: str = "block", placement: str = "output",
               skip_first: bool = False) -> tuple[list[Unit], list[tuple[str, Quantizer]]]:
    """The reconstruction units in forward order and the activation quantizers no unit owns."""
    cands: list[str] = []
    for name, m in model.named_modules():
        if not name or any(_inside(name, c) for c in cands):
            continue
        if granularity == "block" and is_block(m) and any(isinstance(x, QUANT_LAYERS) for x in m.modules()):
            cands.append(name)
        elif isinstance(m, QUANT_LAYERS):
            cands.append(name)
    mods = {n: model.get_submodule(n) for n in cands}
    aqs = _act_quantizers(model)

    events: list[tuple[str, str]] = []  # forward order of unit starts and quantizer calls
    unit_in: dict[str, int] = {}
    unit_out: dict[str, int] = {}
    q_out: dict[str, int] = {}
    keep = []
    hooks = []
    for n, m in mods.items():
        def pre(mod, args, n=n):
            events.append(("unit", n))
            if args and isinstance(args[0], torch.Tensor):
                unit_in.setdefault(n, id(args[0]))
                keep.append(args[0])

        def post(mod, args, out, n=n):
            if isinstance(out, torch.Tensor):
                unit_out.setdefault(n, id(out))
                keep.append(out)
        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    for n, q in aqs:
        def qhook(mod, args, out, n=n):
            events.append(("q", n))
            q_out.setdefault(n, id(out))
            keep.append(out)
        hooks.append(q.register_forward_hook(qhook))
    modes = {n: q.mode for n, q in aqs}
    for _, q in aqs:
        q.mode = "off"
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        for n, q in aqs:
            q.mode = modes[n]

    order: list[str] = []
    for kind, n in events:
        if kind == "unit" and n not in order:
            order.append(n)
    order += [n for n in cands if n not in order]  # never called: left at the end (not reconstructed)
    units = [Unit(n, mods[n], [(n if not ln else f"{n}.{ln}", lm) for ln, lm in mods[n].named_modules()
                               if isinstance(lm, QUANT_LAYERS)]) for n in order]
    by_name = {u.name: u for u in units}
    if skip_first and units and not is_block(units[0].module):
        units[0].skip = True

    orphans = []
    first_call = {}
    for i, (kind, n) in enumerate(events):
        first_call.setdefault((kind, n), i)
    for qn, q in sorted(aqs, key=lambda t: first_call.get(("q", t[0]), 1 << 30)):
        container = next((u for u in units if _inside(qn, u.name)), None)
        oid = q_out.get(qn)
        consumer = next((by_name[n] for n in order if oid is not None and unit_in.get(n) == oid), None)
        if container is not None and (oid is None or unit_out.get(container.name) != oid):
            owner = container  # internal to the unit
        elif placement == "input":
            owner = consumer or container
        else:
            owner = container or consumer
        if owner is None:
            orphans.append((qn, q))
            continue
        owner.owned.append((qn, q))
        if not _inside(qn, owner.name):
            owner.inputs.append((qn, q))
    return units, orphans


def _placement(layout) -> str:
    if layout is None:
        return "output"
    from ..spec import PROTOCOLS

    proto = PROTOCOLS.get(layout.protocol)
    if proto is not None:
        return proto.act_placement
    return "input" if any(a.where == "in" for a in layout.acts) else "output"


# --------------------------------------------------------------------------------------------------
# method presets (paper defaults; budgets override iters etc. through recipe hparams)
# --------------------------------------------------------------------------------------------------
def method_passes(method: str, hp: dict[str, Any] | None = None, *, protocol_name: str = "ptq") -> list[ReconConfig]:
    """The reconstruction passes of ``adaround`` | ``brecq`` | ``qdrop`` | ``genie-m``.

    ``hp`` (recipe hparams) override :class:`ReconConfig` fields (unknown keys are ignored here:
    they belong to the quantizer wrapper, e.g. ``w_observer``); for BRECQ, ``iters_a`` / ``lr_a``
    set the activation pass.
    """
    hp = dict(hp or {})
    names = {f.name for f in dataclasses.fields(ReconConfig)}
    skip_first = protocol_name != "genie-native"  # BRECQ convention; Genie's code reconstructs every layer
    common = {"skip_first": skip_first}
    ov = {k: v for k, v in hp.items() if k in names}
    if method == "genie-m":
        # SamsungLabs/Genie reconstruct.py: joint rounding + weight step + LSQ act steps, QDrop, round weight 1
        return [ReconConfig(**{**common, **ov})]
    if method == "qdrop":
        # wimh966/QDrop recon.py + exp config: weight 0.01, scale_lr 4e-5, drop_prob 0.5, Adam 1e-3 on rounding
        return [ReconConfig(**{**common, "round_weight": 0.01, "lr_w_scale": 0.0, **ov})]
    if method == "brecq":
        # yhhhli/BRECQ main_imagenet.py: stage 1 weights (AdaRound, weight 0.01, act quant off),
        # stage 2 activation steps only (LSQ, lr 4e-4, 5000 iterations), quantized inputs only
        w = ReconConfig(**{**common, "round_weight": 0.01, "lr_w_scale": 0.0, "act_quant": False, "lr_a_scale": 0.0,
                           "drop_prob": 0.0, "input_mix": 1.0, **ov})
        a_ov = {k: v for k, v in ov.items() if k not in ("iters", "round_weight", "lr_a_scale", "learn_weights")}
        act = BrecqActConfig.from_hparams(hp)
        a = ReconConfig(**{**common, "learn_weights": False, "lr_w_scale": 0.0, "act_quant": True,
                           "lr_a_scale": float(act.lr_a), "iters": int(act.iters_a),
                           "drop_prob": 0.0, "input_mix": 1.0, **a_ov})
        return [w, a]
    if method == "adaround":
        # AdaRound (Nagel et al. 2020) as BRECQ runs it layer-wise: weights only, round weight 0.01,
        # quantized inputs; activation ranges calibrated (L_p search) after the weights are fixed
        w = ReconConfig(**{**common, "granularity": "layer", "round_weight": 0.01, "lr_w_scale": 0.0,
                           "act_quant": False, "lr_a_scale": 0.0, "drop_prob": 0.0, "input_mix": 1.0, **ov})
        a = ReconConfig(**{**common, "granularity": "layer", "learn_weights": False, "lr_w_scale": 0.0,
                           "act_quant": True, "lr_a_scale": 0.0, "iters": 0, "drop_prob": 0.0, "input_mix": 1.0,
                           **{k: v for k, v in ov.items() if k not in ("iters", "granularity", "learn_weights",
                                                                         "lr_a_scale")}})
        return [w, a]
    raise BadValueError(f"unknown reconstruction method '{method}' (adaround, brecq, qdrop, genie-m)")


RECON_METHODS = ("adaround", "brecq", "qdrop", "genie-m")
