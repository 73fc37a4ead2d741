"""Distillation fine-tuning (QAT) of fake-quantized models on synthetic data (see :mod:`zsq.qat.engine`).

The ``qat-kd`` quantizer and the QAT recipes are registered by :mod:`zsq.qat.recipes`, which
``zsq.recipes`` imports at its end.
"""

from .engine import QATConfig, QATInterrupted, QATTrainer, kd_loss, qat_finetune, quantize_qat

__all__ = ["QATConfig", "QATInterrupted", "QATTrainer", "kd_loss", "qat_finetune", "quantize_qat"]
