"""The recipe catalogue: every literature method declared with :func:`zsq.recipes.recipe`, one module per
family, its paper defaults and budgets beside it (as timm's model files). Importing this package registers
every recipe, and every synthesizer, quantizer and pre-step a recipe names; :mod:`zsq.recipes` (the
registry) imports none of it.

=======================  ====================================================================  ===========
module                   recipes                                                               quantizers
=======================  ====================================================================  ===========
:mod:`.calib`            minmax-noise, zeroq, dsg, kw                                          calib
:mod:`.reconstruction`   genie, sadag, brecq, mixmix, qdrop                                    genie-m, brecq, qdrop
:mod:`.datafree`         dfq, squant, udfc                                                     dfq, squant, udfc
:mod:`.qat`              qat-zeroq, intraq, hast, synq, plf, texq, deepinversion, gznq        qat-kd
:mod:`.generator`        gdfq, qimera, ait, autorecon, adasg, adadfq, zaq, dfq-akd,            one per game; qdrop
                         causal-dfq, ris, genq
:mod:`.vit`              psaq-vit, psaq-vit-v2, smi, clamp-vit                                 calib, calib-sparse
=======================  ====================================================================  ===========

The import order below is the order of ``zsq methods``.
"""

from .. import synth as _synth  # noqa: F401  (registers every synthesizer)
from . import calib, reconstruction, datafree, qat, generator, vit  # noqa: F401  (each registers its recipes)
from ..recipes import PRE_STEPS, QUANTIZERS, RECIPES

__all__ = ["PRE_STEPS", "QUANTIZERS", "RECIPES"]
