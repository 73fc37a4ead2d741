"""Synthetic calibration data: the synthesizer interface, the shared losses, and the methods.

Importing this package registers every synthesizer in :data:`SYNTHESIZERS`.
"""

from ..data.shards import SyntheticSet
from .base import (
    SYNTHESIZERS, SynthConfig, Synthesizer, batch_generator, batch_seed, get_synthesizer, model_fingerprint, prepared,
    synthesize, synthetic_key,
)
from .losses import BNS_VARIANTS, BNStatsLoss, bn_layers, image_prior_loss
from . import noise as _noise  # noqa: F401  (registers "gaussian")
from . import zeroq as _zeroq  # noqa: F401  (registers "zeroq")
from .noise import GaussianConfig, GaussianNoise
from .zeroq import ZeroQ, ZeroQConfig

__all__ = [
    "BNS_VARIANTS", "BNStatsLoss", "GaussianConfig", "GaussianNoise", "SYNTHESIZERS", "SynthConfig", "Synthesizer",
    "SyntheticSet", "ZeroQ", "ZeroQConfig", "batch_generator", "batch_seed", "bn_layers", "get_synthesizer",
    "image_prior_loss", "model_fingerprint", "prepared", "synthesize", "synthetic_key",
]
