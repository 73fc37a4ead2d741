"""QAT recipes (issue 8): the ``qat-kd`` quantizer and the ``qat-zeroq`` baseline recipe.

Registered on import (``recipes.py`` imports this module at its end):

* quantizer ``qat-kd``: :func:`zsq.qat.engine.quantize_qat`: the protocol's fake-quantized layout
  fine-tuned by distillation from the FP model on the synthetic set (GDFQ-lineage student loop);
  hparams = the :class:`~zsq.qat.engine.QATConfig` fields (plus the ``stop_at`` test hook);
* recipe ``qat-zeroq``: ZeroQ's distilled data + ``qat-kd``, the ablation baseline of the QAT
  methods (IntraQ, HAST, SynQ ... change the data or add loss terms to exactly this loop).

Budgets of ``qat-zeroq`` (ResNet-20, CIFAR-10):

* ``paper``: the fixed-set lineage's size [code: zysxmu/IntraQ]: 5,120 images (ZeroQ's official
  500 iterations per batch of 32) and 151 epochs x 200 steps of batch 256 (30,200 steps);
* ``default``: 5,120 images (the zeroq synthesizer's default preset: batches of 256 x 120
  iterations) and 4 epochs x 250 steps of batch 256 (the paper's batch and lr 1e-4; 20 EMA warm-up
  steps = 2% of 1,000, then 980 training steps), fp32, channels_last. Sized from timed steps of
  ResNet-20 W4A4 at batch 256 on one core of the 2-core machine while another job held the other
  core: 1.29 s per training step (fp32, channels_last; 1.50 s contiguous, 0.94 s bf16), so ~21 min
  of QAT on one loaded core, ~12-15 min on two; the 5,120-image synthesis adds ~17 CPU-minutes
  (zeroq's 51 CPU-s per batch of 256), ~9 min on two cores: the whole run fits ~25 min;
* ``smoke``: the zeroq smoke set (32 images x 30 iterations) and 4 steps of batch 16 (1 EMA warm-up
  step + 3 training steps): seconds.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..recipes import HPARAM_KEYS, QUANTIZERS, RECIPES, QuantContext, Recipe
from .engine import QATConfig, quantize_qat


@QUANTIZERS.register("qat-kd")
def quant_qat_kd(ctx: QuantContext) -> nn.Module:
    """Distillation fine-tuning of the fake-quantized model (GDFQ lineage, fixed synthetic set): a
    4-epoch warm-up that only tracks EMA activation ranges (momentum 0.9), frozen afterwards; then KD
    (alpha 20, T 20, batchmean) from the FP teacher, SGD-Nesterov lr 1e-4 with a cosine schedule, BN
    statistics frozen, per-channel min-max weights recomputed every step; 151 epochs x 200 steps of
    batch 256 [code: zysxmu/IntraQ trainer_direct.py]. hparams: QATConfig fields."""
    return quantize_qat(ctx)


HPARAM_KEYS["qat-kd"] = frozenset({f.name for f in dataclasses.fields(QATConfig)} | {"stop_at"})

#: default budget: see the module docstring (sized from measured s/step)
_DEFAULT_QUANT = {"epochs": 4, "steps_per_epoch": 250, "batch_size": 256}

RECIPES.add("qat-zeroq", Recipe(
    name="qat-zeroq", family="baseline", kind="QAT",
    paper="(baseline) ZeroQ data + KD fine-tuning, the GDFQ-lineage QAT loop (IntraQ/HAST protocol)",
    protocol="qat", synth="zeroq", quant="qat-kd",
    # the loss and optimiser defaults (= QATConfig's), listed so `zsq methods` and zsq.json show them
    hparams={"lr": 1e-4, "kd_weight": 20.0, "temperature": 20.0, "ce_weight": 0.0, "ema_epochs": 4},
    budgets={
        "smoke": {"quant": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 16}},
        "default": {"n_images": 5120, "quant": dict(_DEFAULT_QUANT)},
        "paper": {"n_images": 5120},
    },
    doc=("ZeroQ's distilled images (per-image BN-statistics matching) as a fixed training set, then the "
         "shared QAT loop: the `qat` layout (every Conv/Linear at W bits, activations after every ReLU, BN "
         "kept with frozen statistics), a warm-up of EMA activation ranges (4 epochs, no training; then "
         "frozen), then KD from the FP model (alpha 20, T 20, batchmean KL), SGD-Nesterov (momentum 0.9, "
         "weight decay 1e-4) with a cosine lr, per-channel min-max weights recomputed every step, IntraQ's "
         "random-resized-crop + flip on the synthetic images; last epoch reported. The baseline the QAT "
         "methods (IntraQ, HAST, SynQ) are ablations of. paper: 5,120 images, 151 x 200 steps of batch 256, "
         "lr 1e-4 [code: zysxmu/IntraQ]. default: 5,120 images, 4 x 250 steps of batch 256 (20 warm-up "
         "steps), ~25 min on 2 cores."),
))
