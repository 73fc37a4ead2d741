"""Neutral ops: small modules that models build with and quantizers recognise, so neither
:mod:`zsq.models` nor :mod:`zsq.quant` has to import the other (brevitas keeps such ops below both).

* :class:`MatMul`: ``a @ b`` between two activations as a module (a ViT's ``q @ k^T`` and ``attn @ v``),
  so hooks see both operands and :mod:`zsq.quant.protocol` can swap it for
  :class:`~zsq.quant.modules.QuantMatMul`.
"""

from __future__ import annotations

import torch
from torch import nn


class MatMul(nn.Module):
    """``a @ b`` as a module, so hooks and quantizers see both operands (PTQ4ViT / FQ-ViT style)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


__all__ = ["MatMul"]
