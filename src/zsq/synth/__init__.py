"""Synthetic calibration data: the synthesizer interface, the shared losses, and the methods.

Importing this package registers every synthesizer in :data:`SYNTHESIZERS`.
"""

from ..data.shards import SyntheticSet
from .base import (
    SYNTHESIZERS, SynthConfig, Synthesizer, batch_generator, batch_seed, get_synthesizer, model_fingerprint, prepared,
    synthesize, synthetic_key,
)
from .losses import BNS_VARIANTS, BNStatsLoss, bn_layers, image_prior_loss, l2_image_loss, tv_loss
from . import noise as _noise  # noqa: F401  (registers "gaussian")
from . import zeroq as _zeroq  # noqa: F401  (registers "zeroq")
from .deepinversion import GZNQ, DeepInversion, KnowledgeWithin, MixMix  # registers the four
from .dsg import DSG  # registers "dsg"
from .intraq import HAST, IntraQ, TexQ  # registers the three
from .noise import GaussianConfig, GaussianNoise
from .pixel import PixelConfig, PixelSynthesizer
from .vit import CLAMPViT, PSAQViT, PSAQViTV2, SMI  # registers psaq-vit, psaq-vit-v2, smi, clamp-vit
from .zeroq import ZeroQ, ZeroQConfig
from . import genie as _genie  # noqa: F401,E402  (registers "genie")
from . import sadag as _sadag  # noqa: F401,E402  (registers "sadag", Genie-D plus a term on the quantized model)

__all__ = [
    "BNS_VARIANTS", "BNStatsLoss", "DSG", "DeepInversion", "GZNQ", "GaussianConfig", "GaussianNoise", "HAST", "IntraQ",
    "KnowledgeWithin", "MixMix", "PixelConfig", "PixelSynthesizer", "SYNTHESIZERS", "SynthConfig", "Synthesizer",
    "SyntheticSet", "TexQ", "ZeroQ", "ZeroQConfig", "batch_generator", "batch_seed", "bn_layers", "get_synthesizer",
    "image_prior_loss", "l2_image_loss", "model_fingerprint", "prepared", "synthesize", "synthetic_key", "tv_loss",
]
__all__ += ["CLAMPViT", "PSAQViT", "PSAQViTV2", "SMI"]
