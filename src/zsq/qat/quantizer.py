"""The ``qat-kd`` quantizer: :func:`zsq.qat.engine.quantize_qat`, the protocol's fake-quantized layout
fine-tuned by distillation from the FP model on the synthetic set (GDFQ-lineage student loop); hparams =
the :class:`~zsq.qat.engine.QATConfig` fields (plus the ``stop_at`` test hook). Registered in
:data:`zsq.recipes.QUANTIZERS` on import; the QAT recipes (``qat-zeroq`` and the methods that change its
data or add student terms) are declared in :mod:`zsq.catalogue.qat`.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..recipes import HPARAM_KEYS, QUANTIZERS, QuantContext
from .engine import QATConfig, quantize_qat


@QUANTIZERS.register("qat-kd")
def quant_qat_kd(ctx: QuantContext) -> nn.Module:
    """Distillation fine-tuning of the fake-quantized model (GDFQ lineage, fixed synthetic set): a
    4-epoch warm-up that only tracks EMA activation ranges (momentum 0.9), frozen afterwards; then KD
    (alpha 20, T 20, batchmean) from the FP teacher, SGD-Nesterov with a cosine schedule, BN
    statistics frozen, per-channel min-max weights recomputed every step; 151 epochs x 200 steps of
    batch 256 [code: zysxmu/IntraQ trainer_direct.py]. hparams: QATConfig fields."""
    return quantize_qat(ctx)


HPARAM_KEYS["qat-kd"] = frozenset({f.name for f in dataclasses.fields(QATConfig)} | {"stop_at"})
