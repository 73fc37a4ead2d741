"""The record a model carries through zsq: one :class:`QuantizedModel` in ``module.zsq_record``.

``zsq.models.load_model`` starts it (``model``: id, weights SHA-256, evaluation preprocessing,
class count), ``zsq.quant.protocol.apply_protocol`` adds the ``layout`` (every quantized tensor),
each method its own entry in ``methods`` (``"recon"``, ``"qat"``, ``"dfq"``, ``"datafree"``) and
``zsq.quantize`` / ``zsq.load`` the provenance (``result``: recipe, protocol, bits, data, wall
time, size). ``zsq.quantize`` still returns the ``nn.Module``; export, report and evaluation read
its record with :func:`record_of` / :func:`model_info`, never attributes of their own.

The record is a plain attribute: it is no part of the state dict and changes no computation;
``copy.deepcopy`` of the module copies it. It sits in layer 0 (it imports nothing of zsq), so its
fields name their types in words: ``model`` is a :class:`zsq.models.registry.ModelInfo`,
``layout`` a :class:`zsq.quant.protocol.Layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: the one attribute of the module that holds its record
ATTR = "zsq_record"


@dataclass
class QuantizedModel:
    """What zsq knows of a model: where it came from and, once quantized, how and by which steps."""

    model: Any = None  # ModelInfo: id, weights_sha256, preprocess, num_classes (load_model)
    layout: Any = None  # Layout: protocol, bits, weight / activation quantizers (apply_protocol)
    result: dict[str, Any] = field(default_factory=dict)  # provenance: the zsq.json fields quantize / load set
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method: recon, qat, dfq, datafree
    generator: Any = None  # the generator a game trained (zsq.gen), an nn.Module outside the state dict


def record_of(module: Any) -> QuantizedModel:
    """The record of ``module``; an empty one is attached when it has none."""
    rec = getattr(module, ATTR, None)
    if rec is None:
        rec = QuantizedModel()
        object.__setattr__(module, ATTR, rec)  # a plain attribute, whatever the module's __setattr__ does
    return rec


def model_info(module: Any) -> Any:
    """The model part of ``module``'s record (``ModelInfo``), None when it has none (nothing is attached)."""
    rec = getattr(module, ATTR, None)
    return rec.model if rec is not None else None
