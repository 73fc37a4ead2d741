"""Named benchmark suites (what runs for docs/results.md)."""

from __future__ import annotations

from .runner import Run

BITS = [(8, 8), (4, 8), (4, 4), (3, 3)]
PROTOCOLS = ["ptq", "qat", "fixed", "genie-native"]


def foundation(seeds=(0, 1, 2)) -> list[Run]:
    """Issue 4: minmax-noise, zeroq and real-data calibration on ResNet-20 for all four protocols
    at W8A8/W4A8/W4A4/W3A3 (seed 0), plus 3 seeds of zeroq under ptq at W4A8/W4A4."""
    runs = []
    m = "cifar10_resnet20"
    for proto in PROTOCOLS:
        for w, a in BITS:
            runs.append(Run(m, "minmax-noise", proto, w, a))
            runs.append(Run(m, "zeroq", proto, w, a))
            # the zero-shot gap: zeroq's own quantizer calibrated on real training images instead
            runs.append(Run(m, "zeroq", proto, w, a, calib="cifar10-jpeg/train.tar", calib_n=256))
    for s in seeds[1:]:
        for w, a in [(4, 8), (4, 4)]:
            runs.append(Run(m, "zeroq", "ptq", w, a, seed=s))
    for w, a in [(4, 8), (4, 4)]:  # the official ZeroQ configuration (32 images x 500 its, min-max weights)
        runs.append(Run(m, "zeroq", "ptq", w, a, budget="paper"))
    return runs


def models(seeds=(0,)) -> list[Run]:
    """ResNet-32 and EfficientNet-Lite0 rows of the foundation recipes (ptq, seed 0)."""
    runs = []
    for w, a in BITS:
        for r in ("minmax-noise", "zeroq"):
            runs.append(Run("cifar10_resnet32", r, "ptq", w, a))
            runs.append(Run("efficientnet_lite0", r, "ptq", w, a, eval="imagenet-sample/val256.tar"))
    return runs


def genie(seeds=(0, 1, 2)) -> list[Run]:
    """Issue 5: ``genie`` (Genie-D + Genie-M, default budget) on ResNet-20: ``genie-native`` W4A4 and
    W3A3 (3 seeds for W3A3 first, the target that needs them), then the other seeds at W4A4, the
    ``ptq`` rows and ``genie-native`` W2A4 (seed 0), the reconstruction on real images (a reference; each
    seed draws its own 256 training images), then EfficientNet-Lite0 at W8A8 / W4A8 / W4A4 with a
    reduced budget (``EFFNET_GENIE``). A seed's synthetic set is made by its first run and reused by the
    others."""
    m = "cifar10_resnet20"
    runs = [Run(m, "genie", "genie-native", 4, 4, seed=seeds[0])]
    runs += [Run(m, "genie", "genie-native", 3, 3, seed=s) for s in seeds]
    runs += [Run(m, "genie", "genie-native", 4, 4, seed=s) for s in seeds[1:]]
    runs += [Run(m, "genie", "ptq", w, a, seed=seeds[0]) for w, a in [(4, 4), (3, 3)]]
    runs.append(Run(m, "genie", "genie-native", 2, 4, seed=seeds[0]))  # reported, no target
    # the same Genie-M reconstruction on 256 real training images (a reference, not zero-shot): what the
    # synthetic data costs against real data
    runs += [Run(m, "genie", "genie-native", w, a, seed=s, calib="cifar10-jpeg/train.tar")
             for s in seeds for w, a in [(3, 3), (4, 4)]]
    # EfficientNet-Lite0 at a reduced budget (EFFNET_GENIE), Gaussian-noise calibration beside it
    e, ev = "efficientnet_lite0", "imagenet-sample/val256.tar"
    for w, a in [(8, 8), (4, 8), (4, 4)]:
        runs.append(Run(e, "genie", "genie-native", w, a, seed=seeds[0], eval=ev, extra=EFFNET_GENIE))
        runs.append(Run(e, "minmax-noise", "genie-native", w, a, seed=seeds[0], eval=ev))
    # the same with the weight step learnt relative to its size (GENIE_REL_STEP; the W8A8 finding)
    for w, a in [(8, 8), (4, 8), (4, 4)]:
        runs.append(Run(e, "genie", "genie-native", w, a, seed=seeds[0], eval=ev, extra=EFFNET_GENIE + GENIE_REL_STEP))
    # Genie-D with a learnable scale / shift after its generator's last BN (GENIE_OUT_AFFINE; chosen on the
    # validation split's agreement with the FP model): W3A3 then W4A4 per seed, the seed's set shared
    runs += [Run(m, "genie", "genie-native", w, a, seed=s, extra=GENIE_OUT_AFFINE) for s in seeds
             for w, a in [(3, 3), (4, 4)]]
    # Genie-D + cross-entropy to balanced labels (GENIE_CE; the lowest KL to FP on the validation split)
    runs += [Run(m, "genie", "genie-native", w, a, seed=s, extra=GENIE_CE) for s in seeds for w, a in [(3, 3), (4, 4)]]
    # Genie-M on the default set plus 3 mirrored / shifted copies of it (GENIE_AUG; better KL to FP and hard-image
    # agreement on the validation split), W3A3: 77.08 over 3 seeds against the plain set's 77.17, so W4A4 was not run
    runs += [Run(m, "genie", "genie-native", 3, 3, seed=s, extra=GENIE_AUG) for s in seeds]
    return runs


def genie_paper(seeds=(0,)) -> list[Run]:
    """Issue 5, optional part: ``genie`` at the paper's budget on ResNet-20 (``genie-native``, W3A3 then W4A4 on
    the same synthetic set). Genie-D: 1,024 images x 4,000 iterations in fp32 (8 batches of 128); Genie-M:
    20,000 steps per block at batch 32. Cost: a synthesis iteration (fp32, batch 128) measured 1.4 s on one
    thread beside three other runs, so ~12.6 h of synthesis alone that way (32,000 iterations; ~3.5 h
    estimated with both cores free), then ~1.5-3 h per bit setting (20,000 steps x 11 blocks at ~25 ms).
    Well beyond the issue's ~6 h benchmark budget, so not run yet. Resumable over sittings: finished
    synthesis batches are cached shards, the reconstruction checkpoints per block and within a block
    (``zsq bench run genie-paper --threads 1`` continues)."""
    return [Run("cifar10_resnet20", "genie", "genie-native", w, a, seed=s, budget="paper")
            for s in seeds for w, a in [(3, 3), (4, 4)]]


#: EfficientNet-Lite0's reduced ``genie`` budget (issue 5; the paper: 1,024 images x 4,000 iterations, 20,000
#: reconstruction steps per block): 64 synthetic 224 px images x 150 iterations (schedules scaled like the
#: default's: patience / decay every 4) and 500 reconstruction steps per block at batch 8 (the default: 3,000).
#: Sized from measured costs on 2 cores (a 32-image forward+backward ~2 s; a reconstruction step over all
#: blocks ~1.2 s): ~10 min synthesis, ~10 min per bit setting. Not tuned.
EFFNET_GENIE = ("--synth-set", "n_images=64", "--synth-set", "batch_size=32", "--synth-set", "iters=150",
                "--synth-set", "plateau_patience=4", "--synth-set", "g_decay_every=4", "--set", "iters=500")


#: Genie-M with the weight step learnt as log(s / s_0) (``w_scale_param=relative``) instead of Genie's absolute
#: Adam lr 1e-4 on s, which moves EfficientNet-Lite0's small 8-bit steps (median 2e-3, depthwise layers 3e-4) by
#: a large fraction of themselves per step: W8A8 fell from 88.7 (no reconstruction) to 84.0 after 100 steps.
#: lr chosen on the validation split (bench/genie_validation.py, ResNet-20 W3A3 / W4A4 / W8A8).
GENIE_REL_STEP = ("--set", "w_scale_param=relative", "--set", "lr_w_scale=1e-3")


#: Genie-D's generator with a learnable per-channel scale / shift after its last BN (``out_affine``, not the
#: paper's): the input channels are otherwise pinned at mean 0 / std 1, while real ones (under ResNet-20's
#: ImageNet normalisation) sit at mean 0.03-0.18, std 1.06-1.15. On the validation split (W3A3 proxy, seeds
#: 0-1) it raised agreement with the FP model (+0.2 / +0.3) and on the FP model's least sure images (+2.5 /
#: +2.3), closer to real images; top-1 on the split (training images) did not separate real from synthetic.
GENIE_OUT_AFFINE = ("--synth-set", "out_affine=true")

#: Genie-D + cross-entropy of the teacher's logits to balanced target labels at weight 1 (``ce_weight``, not
#: the paper's). On the validation split (W3A3 proxy, seeds 0-1) it had the lowest KL to the FP model of the
#: synthetic sets tried (0.363 vs 0.381 for Genie-D, 0.334 for real images; 0.1: lower top-1, -0.44);
#: with ``out_affine`` as well, the KL rose (0.403), so the two are not combined.
GENIE_CE = ("--synth-set", "ce_weight=1.0")

#: Genie-M reconstructing on the synthetic set plus 3 randomly shifted (<= 4 px, zero padding) and mirrored
#: copies of it (``augment``, zsq.data.augment; not the paper's): the reconstruction overfits 256 images (more
#: steps do not help beyond ~1,000 on the budget curve). On the validation split (W3A3 proxy, seeds 0-1) it
#: lowered KL to the FP model (0.365 vs 0.381 for the plain set; GENIE_CE 0.363, real images 0.334) and gave
#: the highest agreement on the FP model's least sure images of any set (56.65 vs 53.45; real 56.55); mirror
#: copies alone: KL 0.372, 55.05. On the test set, W3A3 over 3 seeds: 77.08 vs 77.17, no gain.
GENIE_AUG = ("--set", "augment=flipshift", "--set", "augment_copies=3")


#: ``genie`` given sadag's synthesis wall time: sadag's default synthesis took 244 s against genie's 135 s
#: (256 images, ResNet-20, measured by bench/sharpness.py's runs), so 1.8x the iterations, with the two
#: iteration-counted schedules (generator decay, latent plateau patience) stretched by the same factor
GENIE_MATCHED_TIME = ("--synth-set", "iters=540", "--synth-set", "g_decay_every=14",
                      "--synth-set", "plateau_patience=14")


def sadag(seeds=(0, 1, 2)) -> list[Run]:
    """Issue 6: ``sadag`` against ``genie`` (same image count, same Genie-M quantizer) on ResNet-20, then
    ResNet-32, ``genie-native`` then ``ptq``, W3A3 / W2A4 (the target's bits) then W4A4, 3 seeds each; the
    ``genie`` rows are shared with the ``genie`` suite (a finished one is skipped). After each model's
    ``genie-native`` rows: ``genie`` with sadag's synthesis time (``GENIE_MATCHED_TIME``) at W3A3 / W2A4
    (1.8x genie's iterations, measured on ResNet-20; on ResNet-32 the first runs' walls put sadag's
    synthesis at ~1.5x genie's, so there the matched rows give genie slightly more time than sadag).
    A seed's synthetic set is made by its first run and reused by the others (~9 h in all on 2 cores:
    resumable)."""
    runs = []
    for m in ("cifar10_resnet20", "cifar10_resnet32"):
        for proto in ("genie-native", "ptq"):
            runs += [Run(m, r, proto, w, a, seed=s) for w, a in [(3, 3), (2, 4), (4, 4)] for s in seeds
                     for r in ("sadag", "genie")]
            if proto == "genie-native":
                runs += [Run(m, "genie", proto, w, a, seed=s, extra=GENIE_MATCHED_TIME)
                         for w, a in [(3, 3), (2, 4)] for s in seeds]
    return runs


def qat(seeds=(0,), recipes=None) -> list[Run]:
    """Issue 8: the QAT recipes on ResNet-20 under ``qat`` at W4A4 and W3A3 (default budget = 5,120
    synthetic images, the shared KD loop), the ablation baseline ``qat-zeroq`` first; then the PTQ papers
    of the family (DSG, KW, MixMix) the way their papers evaluate, each under its recipe's native protocol."""
    from ..recipes import RECIPES

    m = "cifar10_resnet20"
    rs = list(recipes) if recipes is not None else QAT_RECIPES + NOISE_PTQ_RECIPES
    return [Run(m, r, RECIPES[r].protocol, w, a, seed=s) for r in rs for s in seeds for w, a in [(4, 4), (3, 3)]]


#: issue 8's best three noise-optimization recipes by their seed-0 runs (W3A3: gznq 72.38, deepinversion 71.95,
#: synq 71.78; the next, intraq, 63.46), and the ablation baseline, which get seeds 1-2 (``qat-seeds`` suite),
#: in run order
QAT_SEEDED = ["gznq", "deepinversion", "synq", "qat-zeroq"]


def qat_seeds(seeds=(1, 2)) -> list[Run]:
    """Issue 8: seeds 1-2 of the best ``qat`` recipes and of the ``qat-zeroq`` baseline (W4A4 and W3A3),
    one recipe's seeds after the other so a partial run still completes whole recipes."""
    return qat(seeds, QAT_SEEDED)


def gen(seeds=(0,)) -> list[Run]:
    """Issue 10: the generator recipes on ResNet-20 under ``qat`` at W4A4 and W3A3 (one equal default
    budget: the generator game inside the quantizer)."""
    return qat(seeds, GEN_RECIPES)


#: issue 10's best three generator recipes by their seed-0 runs (mean of W4A4 and W3A3: adadfq 70.42, adasg
#: 70.29, dfq-akd 66.45), which get seeds 1-2 (``gen-seeds`` suite), in run order (the cheapest first)
GEN_SEEDED = ["dfq-akd", "adadfq", "adasg"]


def gen_seeds(seeds=(1, 2)) -> list[Run]:
    """Issue 10: seeds 1-2 of the best three generator recipes (``GEN_SEEDED``) at W4A4 and W3A3, one
    recipe's seeds after the other."""
    return qat(seeds, GEN_SEEDED)


def vit(seeds=(0, 1, 2)) -> list[Run]:
    """Issue 11: the ViT recipes on ``cifar10_vit_tiny`` under ``vit-ptq`` at W8A8 and W4A8 (seed 0),
    Gaussian-noise calibration (``minmax-noise``, with min-max and with the recipes' MSE activation ranges)
    and real-image calibration (32 training images, the zero-shot gap) beside them, then seeds 1-2 of
    every ViT recipe at W4A8 and W8A8 (cheap: 32 images each). ``vit-data`` is the W4A4 companion suite."""
    m = "cifar10_vit_tiny"
    runs = []
    for w, a in [(8, 8), (4, 8)]:
        runs.append(Run(m, "minmax-noise", "vit-ptq", w, a))
        runs.append(Run(m, "minmax-noise", "vit-ptq", w, a, extra=("--set", "a_observer=mse")))
        runs.append(Run(m, "psaq-vit", "vit-ptq", w, a, calib="cifar10-jpeg/train.tar", calib_n=32))
        runs += [Run(m, r, "vit-ptq", w, a) for r in VIT_RECIPES]
    runs += [Run(m, r, "vit-ptq", 4, 8, seed=s) for s in seeds[1:] for r in VIT_RECIPES]
    runs += [Run(m, r, "vit-ptq", 8, 8, seed=s) for s in seeds[1:] for r in VIT_RECIPES]
    return runs


#: reduced block-reconstruction budget of the ``vit_data`` rows (BRECQ default: 2,000 + 500 steps per block)
VIT_RECON_SET = ("--set", "iters=500", "--set", "iters_a=100")


def vit_data(seed: int = 0) -> list[Run]:
    """Issue 11, where calibration data matters on the ViT: W4A4 with min-max calibration (each recipe,
    noise, 32 real images), the same with MSE-searched activation ranges, then W4A4 with block
    reconstruction (``brecq``, a reduced budget ``VIT_RECON_SET``) on 32 images of each synthesizer and
    of real training images, and on 256 Gaussian-noise images."""
    m = "cifar10_vit_tiny"
    runs = [Run(m, "minmax-noise", "vit-ptq", 4, 4, seed=seed),
            Run(m, "psaq-vit", "vit-ptq", 4, 4, seed=seed, calib="cifar10-jpeg/train.tar", calib_n=32,
                extra=("--set", "a_observer=minmax"))]
    # the official min-max activation ranges (the recipes' ``paper`` quantizer; ``default`` uses MSE)
    runs += [Run(m, r, "vit-ptq", 4, 4, seed=seed, extra=("--set", "a_observer=minmax")) for r in VIT_RECIPES]
    # the same with MSE-searched activation ranges instead of min-max (outlier-robust)
    mse = ("--set", "a_observer=mse")
    runs += [Run(m, "minmax-noise", "vit-ptq", 4, 4, seed=seed, extra=mse),
             Run(m, "psaq-vit", "vit-ptq", 4, 4, seed=seed, calib="cifar10-jpeg/train.tar", calib_n=32, extra=mse)]
    runs += [Run(m, r, "vit-ptq", 4, 4, seed=seed, extra=mse) for r in VIT_RECIPES]
    # noise: the gaussian synthesizer's 256 images (more than the synthesizers' 32: in noise's favour)
    runs.append(Run(m, "brecq", "vit-ptq", 4, 4, seed=seed, extra=("--synth", "gaussian", *VIT_RECON_SET)))
    runs.append(Run(m, "brecq", "vit-ptq", 4, 4, seed=seed, calib="cifar10-jpeg/train.tar", calib_n=32,
                    extra=VIT_RECON_SET))
    runs += [Run(m, "brecq", "vit-ptq", 4, 4, seed=seed, extra=("--synth", r, *VIT_RECON_SET)) for r in VIT_RECIPES]
    # the same reconstruction at W4A8, the bits of the noise target (4-bit weights fitted to the data)
    runs.append(Run(m, "brecq", "vit-ptq", 4, 8, seed=seed, extra=("--synth", "gaussian", *VIT_RECON_SET)))
    runs.append(Run(m, "brecq", "vit-ptq", 4, 8, seed=seed, calib="cifar10-jpeg/train.tar", calib_n=32,
                    extra=VIT_RECON_SET))
    runs += [Run(m, "brecq", "vit-ptq", 4, 8, seed=seed, extra=("--synth", r, *VIT_RECON_SET)) for r in VIT_RECIPES]
    return runs


#: issues 5 / 8 / 10, accuracy against budget: (recipe, protocol, the hparam that sets its budget, its ``default``
#: value, the values run). ``qat``: steps per epoch (4 epochs; the EMA warm-up stays 2% of the steps, the cosine
#: schedule spans the run); generator recipes: epochs (one warm-up epoch + 12 at ``default``; the lr
#: milestones are fractions of the epochs); ``genie``: reconstruction steps per block (the synthetic set, made
#: once per seed, is the default run's; the paper runs 20,000). About x0.5 / x1 / x2 / x4 of the default.
BUDGET_CURVES = (("qat-zeroq", "qat", "steps_per_epoch", 250, (125, 250, 500, 1000)),
                 ("gdfq", "qat", "epochs", 13, (7, 13, 25, 49)),
                 ("adasg", "qat", "epochs", 13, (13, 25, 49)),  # the best generator recipe at W3A3 (seed 0)
                 ("genie", "genie-native", "iters", 3000, (1000, 3000, 6000, 12000)))


def budget(seeds=(0,)) -> list[Run]:
    """Issues 5 / 8 / 10: accuracy against budget at W3A3 (the bits whose targets are furthest) for the
    ``qat`` baseline, the generator lineage's base and its best recipe at W3A3, and ``genie``
    (``BUDGET_CURVES``), seed 0; the ``default`` point is the ``qat`` / ``gen`` / ``genie`` suites' run
    (shared). ~6.5 h on 2 cores, resumable."""
    m = "cifar10_resnet20"
    return [Run(m, r, proto, 3, 3, seed=s, extra=() if v == default else ("--set", f"{key}={v}"))
            for r, proto, key, default, values in BUDGET_CURVES for v in values for s in seeds]


#: recipes of the ``qat`` suite, in run order (the baseline first)
QAT_RECIPES = ["qat-zeroq", "intraq", "hast", "synq", "plf", "texq", "deepinversion", "gznq"]
#: issue 8's noise-optimization papers that calibrate or reconstruct instead of fine-tuning (``qat`` suite, last)
NOISE_PTQ_RECIPES = ["dsg", "kw", "mixmix"]
#: recipes of the ``vit`` suite
VIT_RECIPES = ["psaq-vit", "psaq-vit-v2", "smi", "clamp-vit"]
#: recipes of the ``gen`` suite, in run order
GEN_RECIPES = ["gdfq", "qimera", "ait", "adasg", "adadfq", "dfq-akd", "zaq", "autorecon", "causal-dfq", "ris"]

from .suites_datafree import datafree  # noqa: E402

SUITES = {"foundation": foundation, "models": models, "datafree": datafree, "genie": genie,
          "genie-paper": genie_paper, "sadag": sadag, "qat": qat, "qat-seeds": qat_seeds, "gen": gen,
          "gen-seeds": gen_seeds, "budget": budget, "vit": vit, "vit-data": vit_data}

#: one line per suite for ``zsq bench list`` (the docstrings hold the details: sizes, order, sources)
DESCRIPTIONS = {
    "foundation": "minmax-noise, zeroq and real-image calibration on ResNet-20, all protocols and bits",
    "models": "minmax-noise and zeroq on ResNet-32 and EfficientNet-Lite0 (ptq protocol)",
    "datafree": "dfq, squant and udfc with no data, --pre dfq chained in front of others, three models",
    "genie": "genie (Genie-D data, Genie-M reconstruction) on ResNet-20 and EfficientNet-Lite0",
    "genie-paper": "genie at the paper's budget on ResNet-20, W3A3 and W4A4 (many hours; resumable)",
    "sadag": "sadag against genie on ResNet-20 and ResNet-32, 3 seeds, with a time-matched genie",
    "qat": "the QAT recipes on ResNet-20 at W4A4 and W3A3, then dsg, kw and mixmix",
    "qat-seeds": "seeds 1 and 2 of the best three QAT recipes and of the qat-zeroq baseline",
    "gen": "the generator recipes on ResNet-20 at W4A4 and W3A3",
    "gen-seeds": "seeds 1 and 2 of the best three generator recipes",
    "budget": "accuracy against budget at W3A3: qat-zeroq, gdfq, adasg and genie (about 6.5 h; resumable)",
    "vit": "the ViT recipes on cifar10_vit_tiny at W8A8 and W4A8, beside noise and real-image calibration",
    "vit-data": "which calibration data matters on the ViT at W4A4: calibration and BRECQ per data source",
}


def describe(name: str) -> str:
    """The one-line description of suite ``name`` (else the first sentence of its docstring)."""
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    doc = " ".join((SUITES[name].__doc__ or "").split())
    return doc.split(". ")[0].rstrip(".")
