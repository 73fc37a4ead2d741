"""Generator-based recipes (issue 10): one recipe per method, each playing its game's quantizer
(:mod:`zsq.gen.quantizers`, one per game). Every generator recipe is protocol ``qat`` (the lineage's layout:
every Conv/Linear at W bits, activations after every ReLU, BN kept) with ``synth=None``: the generator lives
inside the quantizer, which makes the batches on the fly. hparams = :class:`~zsq.gen.loop.GenConfig`
fields and the game's fields (:mod:`zsq.gen.objectives`); ``ait=true`` adds AIT to any of them. The exception
is ``genq`` (:mod:`zsq.gen.genq`): its generator is a pre-trained diffusion pipeline, run once as the ``genq``
synthesizer, and its quantizer is PTQ (QDrop reconstruction, protocol ``ptq``).

Budgets (ResNet-20, CIFAR-10):

* ``paper``: the official run of each method (iterations, batch; lrs and weights are the recipe's
  hparams, which are the official CIFAR values);
* ``default``: the **same for every generator recipe**: 1,200 student steps of batch 32 after a
  100-iteration warm-up (EMA ranges and generator only; ZAQ, which has no warm-up, starts training
  at once); iterations = 1,200 / ``s_steps`` (+ the warm-up epoch): 13 x 100 for the one-student-step
  games, 12 x 20 for ZAQ (5 student steps per iteration), 13 x 10 for DFQ-AKD (10); multi-step lr
  decays at 25/50/75% of the iterations as the official schedule. Sized from timed smoke-scale
  iterations (ResNet-20 W4A4, batch 32, 1 thread, CPU seconds on the 2-core machine while two other
  jobs ran; wall time was ~2x that): GDFQ 0.65 s per iteration (warm-up 0.68), Qimera and AIT about
  the same, AutoReCon 1.9 s (its searched generator: 64-channel 5x5 and dilated convolutions up to
  32 px), AdaSG/AdaDFQ 0.75 s (one more student forward), ZAQ 8.5 s (5 student steps at ~1.7 s:
  the spatial relation maps of the 32x32 stage-1 features are (B, 1024, 1024); generator step ~0.9
  s), DFQ-AKD 3.3 s (10 student steps). Estimated default runs on one free core: GDFQ / Qimera /
  AIT ~14 min, AutoReCon ~41 min, AdaSG / AdaDFQ ~17 min, ZAQ ~34 min (batch 64 would take ~70 min),
  DFQ-AKD ~7 min; two cores shorten that (not measured here);
* ``smoke``: 2 epochs x 2 iterations of batch 8 (1 warm-up epoch): seconds.

Causal-DFQ and RIS take the shared budgets (``paper``: the lineage's 400 x 200 of batch 200, their
own settings unverified); ``genq`` takes the reconstruction recipes' quantizer budgets with its
synthesizer's image counts (1,024 / 256 / 8).
"""

from __future__ import annotations

from typing import Any

from ..gen import genq as _genq  # noqa: F401  (registers the genq synthesizer)
from ..gen import quantizers as _quantizers  # noqa: F401  (registers one quantizer per game)
from ..recipes import recipe
from .reconstruction import RECON_BUDGETS

#: the default budget, shared: 1,200 student steps of batch 32 after one 100-iteration warm-up epoch
_DEFAULT_STUDENT_STEPS, _DEFAULT_BATCH, _WARMUP = 1200, 32, 100


def _budgets(paper: dict[str, Any], s_steps: int = 1, warmup: bool = True) -> dict[str, dict[str, Any]]:
    """smoke / default / paper of a generator recipe (module docstring): ``paper`` is the method's official run,
    ``s_steps`` its student steps per generator step, ``warmup`` whether it has the warm-up epoch."""
    per_epoch = _WARMUP // s_steps
    default = {"epochs": int(warmup) + _DEFAULT_STUDENT_STEPS // _WARMUP, "steps_per_epoch": per_epoch,
               "batch_size": _DEFAULT_BATCH, "warmup_epochs": int(warmup), "ema_epochs": 1}
    return {
        "smoke": {"quant": {"epochs": 2, "steps_per_epoch": 2, "batch_size": 8, "warmup_epochs": int(warmup),
                            "ema_epochs": 1}},
        "default": {"quant": default},
        "paper": {"quant": paper},
    }


_LINEAGE = {"epochs": 400, "steps_per_epoch": 200, "warmup_epochs": 4, "ema_epochs": 4}

recipe(
    "gdfq", family="generator", kind="QAT", protocol="qat", synth=None, quant="gdfq",
    paper="Generative Low-bitwidth Data Free Quantization (Xu et al., ECCV 2020)",
    hparams={},
    budgets=_budgets({**_LINEAGE, "batch_size": 200}),
    doc=("A conditional generator (label embedding x z, latent 100) learns images the FP model classifies as the "
         "sampled label with BN statistics of the real data (CE + 0.1 BNS; Adam 1e-3, betas 0.5/0.999); the "
         "quantized model is distilled on each batch (KD alpha 1, T 20, KLDivLoss mean + CE on the labels; "
         "SGD-Nesterov 1e-4, wd 1e-4) after 4 warm-up epochs of EMA activation ranges; lrs x0.1 at 25/50/75% "
         "[code: xushoukai/GDFQ]. paper: 400 x 200 iterations of batch 200. default: 1,200 student steps of "
         "batch 32 after a 100-iteration warm-up (~14 CPU-minutes)."),
)

recipe(
    "qimera", family="generator", kind="QAT", protocol="qat", synth=None, quant="qimera",
    paper="Qimera: Data-free Quantization with Synthetic Boundary Supporting Samples (Choi et al., NeurIPS 2021)",
    hparams={},
    budgets=_budgets({**_LINEAGE, "batch_size": 200}),
    doc=("GDFQ's loop with boundary-supporting samples: in 40% of the batches each image superposes 2 label "
         "embeddings with softmax(randn) weights (normalised embedding + noise, disentanglement mapping to 100), "
         "the generator's CE and the student's CE use the mixed soft labels [code: iamkanghyunchoi/qimera, "
         "run_cifar10_4bit.sh]. paper: 400 x 200 of batch 200; default as gdfq."),
)

recipe(
    "ait", family="generator", kind="QAT", protocol="qat", synth=None, quant="gdfq",
    paper="It's All In the Teacher: Zero-Shot Quantization Brought Closer to the Teacher (Choi et al., CVPR 2022)",
    hparams={"ait": True, "weight_decay": 0.0, "gi_threshold": 1e-3},
    budgets=_budgets({**_LINEAGE, "batch_size": 200}),
    doc=("GDFQ's generator with AIT's student: KL-only distillation (no CE) and gradient inundation (per weight "
         "tensor a lr multiplier making >= 0.1% of the integer weights move; threshold x0.1 at the lr milestones) "
         "[code: iamkanghyunchoi/ait GDFQ_AIT, run_cifar10_4bit.sh: wd 0, --passing_threshold 0.001]. Any "
         "generator recipe takes it with --set ait=true (e.g. Qimera+AIT, AdaSG+AIT). paper: 400 x 200 of batch "
         "200; default as gdfq."),
)

recipe(
    "autorecon", family="generator", kind="QAT", protocol="qat", synth=None, quant="autorecon",
    paper=("AutoReCon: Neural Architecture Search-based Reconstruction for Data-free Compression (Zhu et al., "
           "IJCAI 2021)"),
    hparams={},
    budgets=_budgets({**_LINEAGE, "batch_size": 200}),
    doc=("GDFQ's game (CE + 0.1 BNS; KD + CE student) with the searched generator: three cells of searched "
         "upsamplings, convolutions and cross-cell edges with conditional BN [code: iamkanghyunchoi/ait "
         "AutoReCon_AIT model_generator.py, generator_architecture.py; the architecture search itself is not "
         "reproduced]. ARC+AIT (the survey's row) is --set ait=true. paper: 400 x 200 of batch 200; default as gdfq."),
)

recipe(
    "adasg", family="generator", kind="QAT", protocol="qat", synth=None, quant="adasg",
    paper="Rethinking Data-Free Quantization as a Zero-Sum Game (Qian et al., AAAI 2023)",
    hparams={"batch_size": 16},
    budgets=_budgets({**_LINEAGE, "batch_size": 16}),
    doc=("A zero-sum game over sample adaptability: the generator keeps the normalised entropy of the "
         "disagreement f - Q within [0.3, 0.8] with balance terms 0.1 CE(f - Q) + 0.1 CE(f + Q) and BNS; the "
         "quantized model maximises T^2 H((f - Q) / T), T 20 [code: hfutqian/AdaSG]. paper: 400 x 200 of batch "
         "16; default as gdfq (batch 32)."),
)

recipe(
    "adadfq", family="generator", kind="QAT", protocol="qat", synth=None, quant="adadfq",
    paper="Adaptive Data-Free Quantization (Qian et al., CVPR 2023)",
    hparams={"batch_size": 16},
    budgets=_budgets({**_LINEAGE, "batch_size": 16}),
    doc=("AdaSG's game with AdaDFQ's margins lambda [0.1, 0.8] and balance weights 0.2 CE(f - Q) + 0.1 CE(f + Q) "
         "[code: hfutqian/AdaDFQ cifar10_resnet20.hocon]. paper: 400 x 200 of batch 16; default as gdfq."),
)

_ZAQ = {"batch_size": 256, "lr": 1e-3, "nesterov": False, "weight_decay": 5e-4, "g_betas": [0.9, 0.999],
        "milestones": [1 / 3, 2 / 3], "warmup_epochs": 0}

recipe(
    "zaq", family="generator", kind="QAT", protocol="qat", synth=None, quant="zaq",
    paper="Zero-shot Adversarial Quantization (Liu et al., CVPR 2021)",
    hparams=_ZAQ,
    budgets=_budgets({"epochs": 300, "steps_per_epoch": 60, "ema_epochs": 4}, s_steps=5, warmup=False),
    doc=("An unconditional generator (latent 256) maximises the two-level discrepancy between the FP and the "
         "quantized model - output L1 and the spatial/channel relation maps (SCRM) of the stage features - plus "
         "0.1 x the teacher's last-stage activation magnitude; the quantized model minimises the discrepancy, 5 "
         "student steps (fresh batches) per generator step, SGD momentum 0.9, wd 5e-4, Adam 1e-3, x0.1 at epochs "
         "100/200 [code: FLHonker/ZAQ-code main.py]. Student lr 1e-3, not the code's 0.1 (for its train-mode "
         "student): in zsq's student (eval-mode BN, fake quantization) 0.1 and 0.0125 (0.1 scaled to batch 32) "
         "diverge within the first 2 epochs (training loss growing geometrically to NaN at W4A4), 1e-3 lowers it. "
         "No warm-up (the code trains the student from the start). paper: 300 x 60 iterations of batch 256; "
         "default: the shared 1,200 student steps of batch 32 (~34 CPU-minutes)."),
)

recipe(
    "dfq-akd", family="generator", kind="QAT", protocol="qat", synth=None, quant="dfq-akd",
    paper="Data-Free Network Quantization With Adversarial Knowledge Distillation (Choi et al., CVPRW 2020)",
    hparams={"batch_size": 256, "lr_schedule": "cosine", "weight_decay": 0.0},
    budgets=_budgets({"epochs": 250, "steps_per_epoch": 400, "warmup_epochs": 50, "ema_epochs": 4}, s_steps=10),
    doc=("An unconditional generator (latent 512) maximises KL(f || Q) (T 1) regularised by 0.01 x (batch "
         "prediction diversity + per-image confidence + Gaussian-KL BN statistics); the quantized model "
         "minimises the KL, 10 student steps (fresh batches) per generator step; cosine lrs; 50 generator-only "
         "warm-up epochs. No official code: after da2so's unofficial one, whose student (trained from scratch, "
         "lr 0.1) is replaced by the lineage's quantized student (SGD-Nesterov 1e-4). paper: 50 + 200 epochs x "
         "400 iterations of batch 256; default: the shared 1,200 student steps of batch 32."),
)

recipe(
    "causal-dfq", family="generator", kind="QAT", protocol="qat", synth=None, quant="causal-dfq",
    paper="Causal-DFQ: Causality Guided Data-free Network Quantization (Shang et al., ICCV 2023)",
    hparams={},
    budgets=_budgets({**_LINEAGE, "batch_size": 200}),
    doc=("A content-style-decoupled generator (GDFQ's body; a style latent of 32 modulates every hidden BN) makes "
         "pairs of images with one content (latent, label) and two styles, an intervention do(style); the generator "
         "adds to GDFQ's CE + 0.1 BNS the Jensen-Shannon divergence of the teacher's predictions across the styles "
         "and -0.1 x the pixel change (the style must matter); the quantized model adds to the lineage's KD + CE the "
         "discrepancy of the intervened (style-averaged) teacher and student predictions, T^2 KL at T 20. The "
         "official repository holds a readme only: the generator architecture, the loss forms and their weights "
         "are zsq's reading of the paper's abstract (unverified). paper: the lineage's 400 x 200 iterations of batch "
         "200 (unverified); default as gdfq (1,200 student steps of batch 32; timed at gdfq's cost per iteration)."),
)

recipe(
    "ris", family="generator", kind="QAT", protocol="qat", synth=None, quant="ris",
    paper="Robustness-Guided Image Synthesis for Data-Free Quantization (Bai et al., AAAI 2024)",
    hparams={},
    budgets=_budgets({**_LINEAGE, "batch_size": 200}),
    doc=("GDFQ's game whose generator also makes images the teacher sees consistently under perturbation: the "
         "input (+ 0.1 N(0, 1)) and the teacher's weights (+ 0.05 rms(w) N(0, 1)) are perturbed and the "
         "prediction-level KL and the last-stage feature-level 1 - cos between clean and perturbed are minimised; "
         "plus 0.1 x the mean squared correlation of the teacher's logit vectors across the batch (label-space "
         "diversity). No public code: perturbation sizes, loss forms and weights are zsq's (unverified). Student "
         "as GDFQ (KD + CE). paper: the lineage's 400 x 200 iterations of batch 200 (unverified); default as gdfq "
         "(~10% more time per iteration: one perturbed teacher pass)."),
)


# -- GenQ: a text-to-image diffusion pipeline as the generator, then PTQ --------------------------------------------

recipe(
    "genq", family="generator", kind="PTQ", protocol="ptq", synth="genq", quant="qdrop",
    paper="GenQ: Quantization in Low Data Regimes with Generative Synthetic Data (Li et al., ECCV 2024)",
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets={"smoke": {**RECON_BUDGETS["smoke"], "n_images": 8},
             "default": {**RECON_BUDGETS["default"], "n_images": 256},
             "paper": {**RECON_BUDGETS["paper"], "n_images": 1024}},
    doc=("Calibration images from a local text-to-image diffusers pipeline (ZSQ_GENQ_PIPELINE=DIR, extra "
         "'zsq[genq]'; class names from ZSQ_GENQ_CLASSES, CIFAR-10's for 10 classes), prompted 'a photo of a "
         "{class}', 4 candidates per kept image filtered per class by the FP model: the half with the lowest "
         "energy score (label-consistent first), then the ones whose per-image BN statistics are closest to the "
         "model's; optional textual-inversion tokens per class from a few real images (token_data, GenQ's "
         "data-scarce mode); then QDrop block reconstruction (protocol ptq). Not zero-shot in the strict sense "
         "(the pipeline was trained on web data): keep its numbers apart. Filters, prompt, counts and the PTQ "
         "method are zsq's reading of the paper's summary (unverified; the official code link was not "
         "reachable here). paper: 1,024 images at the pipeline's size, 50 steps, 20,000 reconstruction steps "
         "per block; default: 256 images at 256 px, 25 steps, 2 candidates each, 3,000 steps per block; "
         "smoke: 8 images at 64 px, 2 steps."),
)
