"""The generator-game quantizers (``--quant``): one per game of :mod:`zsq.gen.objectives` (``gdfq``,
``qimera``, ``autorecon``, ``adasg``, ``adadfq``, ``zaq``, ``dfq-akd``, ``causal-dfq``, ``ris``), each running
:func:`zsq.gen.loop.quantize_gen`; the generator lives inside the quantizer, which makes the batches on the
fly. Their ``--set`` keys are the loop's (:class:`~zsq.gen.loop.GenConfig` less the fixed-set loop's own
fields) and the game's. Registered in :data:`zsq.recipes.QUANTIZERS` on import; the generator recipes are
declared in :mod:`zsq.catalogue.generator`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from ..qat.engine import QATConfig
from ..recipes import HPARAM_KEYS, QUANTIZERS, QuantContext
from .loop import STUDENT_FIELDS, GenConfig, quantize_gen
from .objectives import GAMES

#: the game each generator quantizer plays (its --set keys are the loop's and the game's fields)
GAME_OF: dict[str, str] = {}
_FIXED_SET_KEYS = {f.name for f in dataclasses.fields(QATConfig)} - STUDENT_FIELDS
LOOP_KEYS = frozenset({f.name for f in dataclasses.fields(GenConfig)} - _FIXED_SET_KEYS | {"stop_at"})


def _quantizer(name: str, game: str, doc: str) -> Callable[[QuantContext], nn.Module]:
    def run(ctx: QuantContext) -> nn.Module:
        return quantize_gen(ctx, game)

    run.__name__, run.__doc__ = f"quant_{name.replace('-', '_')}", doc
    HPARAM_KEYS[name] = LOOP_KEYS | GAMES[game].keys()
    GAME_OF[name] = game
    return QUANTIZERS.add(name, run)


_quantizer("gdfq", "gdfq", "GDFQ's game: conditional generator on CE + 0.1 BNS, student on KD + CE (zsq.gen).")
_quantizer("qimera", "qimera", "Qimera's game: GDFQ with superposed label embeddings and soft labels (zsq.gen).")
_quantizer("autorecon", "autorecon", "AutoReCon's game: GDFQ's losses with the NAS-searched generator (zsq.gen).")
_quantizer("adasg", "adasg", "AdaSG's zero-sum game on the disagreement entropy (zsq.gen).")
_quantizer("adadfq", "adadfq", "AdaDFQ's game: AdaSG with AdaDFQ's margins and weights (zsq.gen).")
_quantizer("zaq", "zaq", "ZAQ's adversarial game on output L1 + SCRM feature discrepancy (zsq.gen).")
_quantizer("dfq-akd", "dfq-akd", "DFQ-AKD's adversarial KD game with BNS / entropy regularisers (zsq.gen).")
_quantizer("causal-dfq", "causal-dfq", "Causal-DFQ's game: content-style generator, style interventions, "
           "discrepancy reduction of the intervened predictions (zsq.gen).")
_quantizer("ris", "ris", "RIS's game: GDFQ's with robustness (input / weight perturbation) and label-space "
           "diversity terms on the generator (zsq.gen).")
