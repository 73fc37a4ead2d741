"""Benchmark suite of the synthesis-free recipes (issue 7): DFQ, SQuant and UDFC under the `fixed`
protocol, no data and no synthesis.

Rows (each one ``zsq quantize`` process; wall time = quantization only, evaluation excluded):

* ResNet-20 (JPEG-CIFAR-10 test set, 10,000 images): dfq / squant / udfc at W8A8, W4A8, W4A4, W3A3,
  seed 0; the best recipe (squant) also at seeds 1 and 2 (the seed only changes the noise of the
  BN-consistent forward that gives the statistics of residual sums);
* chaining: ``--pre dfq`` in front of squant, of the Gaussian-noise min-max baseline and of
  ``zeroq`` (``ptq``, beside plain ``zeroq``), and ``--pre none`` for dfq (its CLE switched off), at
  W4A4 and W3A3;
* ResNet-32 and EfficientNet-Lite0 (ImageNet sample, 1,000 images; depthwise-separable, ReLU6):
  the three recipes at W8A8, W6A6 and W4A8.

Targets (benchmarks.md): W8A8 within 0.1 of FP (81.03); the best recipe above AIMET 2.30's CLE + bias
correction row (W4A8 79.75, W4A4 73.54, W3A3 47.73); each under 10 s.
"""

from __future__ import annotations

from .runner import Run

RECIPES = ("dfq", "squant", "udfc")
BITS = [(8, 8), (4, 8), (4, 4), (3, 3)]
MODEL_BITS = [(8, 8), (6, 6), (4, 8)]
IMAGENET_EVAL = "imagenet-sample/val256.tar"


def datafree(seeds=(0, 1, 2), models: bool = True) -> list[Run]:
    """Issue 7: dfq / squant / udfc (`fixed`), chaining with --pre dfq, ResNet-32 and EfficientNet-Lite0."""
    m = "cifar10_resnet20"
    runs = [Run(m, r, "fixed", w, a) for r in RECIPES for w, a in BITS]
    for s in seeds[1:]:
        runs += [Run(m, "squant", "fixed", w, a, seed=s) for w, a in BITS]
    for w, a in [(4, 4), (3, 3)]:
        runs.append(Run(m, "squant", "fixed", w, a, extra=("--pre", "dfq")))
        runs.append(Run(m, "dfq", "fixed", w, a, extra=("--pre", "none")))
        runs.append(Run(m, "minmax-noise", "fixed", w, a, extra=("--pre", "dfq")))
    for w, a in [(4, 4), (3, 3)]:  # chaining in front of a synthesis recipe (issue 7: measure it)
        runs.append(Run(m, "zeroq", "ptq", w, a))
        runs.append(Run(m, "zeroq", "ptq", w, a, extra=("--pre", "dfq")))
    if models:
        for r in RECIPES:
            for w, a in MODEL_BITS:
                runs.append(Run("cifar10_resnet32", r, "fixed", w, a))
                runs.append(Run("efficientnet_lite0", r, "fixed", w, a, eval=IMAGENET_EVAL))
    return runs
