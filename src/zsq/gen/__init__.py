"""Generator-based zero-shot QAT (the GDFQ lineage): a generator trained against the FP teacher (and,
in the adversarial games, the quantized student) produces the training batches on the fly while the
student is distilled on them. One loop (:mod:`.loop`), one generator family (:mod:`.generators`),
and per method a game (:mod:`.objectives`); AIT's gradient inundation in :mod:`.ait`; GenQ's
diffusion-pipeline synthesizer in :mod:`.genq` (diffusers is imported only when it runs). The
quantizers (one per game) are registered by :mod:`.quantizers`, the recipes declared in
:mod:`zsq.catalogue.generator`."""

from .ait import InundationSGD, inundation_alpha, weight_codes
from .generators import (AutoReConGenerator, CategoricalBN2d, ContentStyleGenerator, GDFQGenerator,
                         SuperposedEmbedding, make_generator)
from .loop import GenConfig, GenTrainer, gen_finetune, quantize_gen
from .objectives import GAMES, Game, Play, Sample, get_game

__all__ = [
    "AutoReConGenerator", "CategoricalBN2d", "ContentStyleGenerator", "GAMES", "GDFQGenerator", "Game", "GenConfig",
    "GenTrainer", "InundationSGD", "Play",
    "Sample", "SuperposedEmbedding", "gen_finetune", "get_game", "inundation_alpha", "make_generator",
    "quantize_gen", "weight_codes",
]
