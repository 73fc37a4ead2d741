"""Distillation fine-tuning (QAT) of fake-quantized models on synthetic data (see :mod:`zsq.qat.engine`).

The ``qat-kd`` quantizer is registered by :mod:`zsq.qat.quantizer`; the QAT recipes are declared in
:mod:`zsq.catalogue.qat`.
"""

from .engine import QATConfig, QATInterrupted, QATTrainer, kd_loss, qat_finetune, quantize_qat

__all__ = ["QATConfig", "QATInterrupted", "QATTrainer", "kd_loss", "qat_finetune", "quantize_qat"]
