"""QAT recipes (issue 8): the ``qat-zeroq`` baseline and the QAT methods, all on the ``qat-kd`` quantizer
(:mod:`zsq.qat.quantizer`: the protocol's fake-quantized layout fine-tuned by distillation from the FP model
on the synthetic set, GDFQ-lineage student loop; hparams = :class:`~zsq.qat.engine.QATConfig` fields).

* recipe ``qat-zeroq``: ZeroQ's distilled data + ``qat-kd``, the ablation baseline of the QAT
  methods (IntraQ, HAST, SynQ ... change the data or add loss terms to exactly this loop);
* recipes ``intraq``, ``hast``, ``synq``, ``plf``, ``texq``, ``deepinversion``, ``gznq``: each
  method's synthesizer (synthesis labels passed on) + ``qat-kd`` with the method's student terms
  (:mod:`zsq.qat.losses` documents each term and its source), native protocol ``qat``.

Every QAT recipe has the budgets of ``qat-zeroq``, so ``default`` is one equal budget for all:
5,120 synthetic images (the synthesizer's ``default`` preset sizes its iterations) and the same
4 x 250 steps of batch 256. ``paper`` is the method's own fine-tuning (epochs, batch) on 5,120
images. The learning rate is qat-zeroq's, except HAST / SynQ's own 1e-5 (their loss is the KD
twice plus extra terms; measured: KD alone at batch 256 already diverges at 1e-4 within ten steps
on real CIFAR images, HAST's loss trains at 1e-5). The methods' terms cost time per step at equal
steps (measured at batch 256 on a loaded core): HAST/SynQ ~2.4x a KD step (input gradient through
student and teacher, a second pass on x'), TexQ ~2.3x (a pass on the mixed batch).

Budgets of ``qat-zeroq`` (ResNet-20, CIFAR-10):

* ``paper``: the fixed-set lineage's size [code: zysxmu/IntraQ]: 5,120 images (ZeroQ's official
  500 iterations per batch of 32) and 151 epochs x 200 steps of batch 256 (30,200 steps);
* ``default``: 5,120 images (the zeroq synthesizer's default preset: batches of 256 x 120
  iterations) and 4 epochs x 250 steps of batch 256 (the paper's batch; lr 3e-5, see below; 20 EMA warm-up
  steps = 2% of 1,000, then 980 training steps), fp32, channels_last. Sized from timed steps of
  ResNet-20 W4A4 at batch 256 on one core of the 2-core machine while another job held the other
  core: 1.29 s per training step (fp32, channels_last; 1.50 s contiguous, 0.94 s bf16), so ~21 min
  of QAT on one loaded core, ~12-15 min on two; the 5,120-image synthesis adds ~17 CPU-minutes
  (zeroq's 51 CPU-s per batch of 256), ~9 min on two cores: the whole run fits ~25 min;
* ``smoke``: the zeroq smoke set (32 images x 30 iterations) and 4 steps of batch 16 (1 EMA warm-up
  step + 3 training steps): seconds.

Learning rate: **3e-5** in every budget, not the lineage's 1e-4. The KD loss is scaled by alpha * T^2
= 8,000; at 1e-4 the first SGD steps move each conv weight by ~0.5 % of its norm, the loss jumps from
~41 to ~500 within three steps and the default run collapsed to 10.8 % test top-1 (W4A4; the record
is in bench/runs/superseded/qat-zeroq-lr1e-4/). The official code survives 1e-4 only in the sense
that it decays the lr by 10x at epochs 20/40/60 of 151 and keeps the best test epoch. Chosen on the
validation split (first 500 images per class of train.tar; bench/qat_validation.py, a quarter of the
default budget): W4A4 12.90 / 83.22 / 81.06 / 79.70 and W3A3 - / 55.34 / 53.94 / - for lr 1e-4 / 3e-5
/ 1e-5 / 3e-6. HAST and SynQ keep their own 1e-5 (their loss is the KD twice plus extra terms).
"""

from __future__ import annotations

from ..qat import quantizer as _quantizer  # noqa: F401  (registers the qat-kd quantizer)
from ..recipes import RECIPES, recipe

#: default budget: see the module docstring (sized from measured s/step)
_DEFAULT_QUANT = {"epochs": 4, "steps_per_epoch": 250, "batch_size": 256}


def _budgets(paper_quant: dict | None = None, **synth: object) -> dict[str, dict]:
    """smoke / default / paper of a QAT recipe: ``qat-zeroq``'s (module docstring), with the
    method's fine-tuning in ``paper`` and synthesizer overrides ``synth`` in every budget."""
    return {
        "smoke": {**synth, "quant": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 16}},
        "default": {"n_images": 5120, **synth, "quant": dict(_DEFAULT_QUANT)},
        "paper": {"n_images": 5120, **synth, **({"quant": dict(paper_quant)} if paper_quant else {})},
    }


recipe(
    "qat-zeroq", family="baseline", kind="QAT", protocol="qat", synth="zeroq", quant="qat-kd",
    paper="(baseline) ZeroQ data + KD fine-tuning, the GDFQ-lineage QAT loop (IntraQ/HAST protocol)",
    # the loss and optimiser defaults (= QATConfig's), listed so `zsq methods` and zsq.json show them
    hparams={"lr": 3e-5, "kd_weight": 20.0, "temperature": 20.0, "ce_weight": 0.0, "ema_epochs": 4},
    budgets=_budgets(),
    doc=("ZeroQ's distilled images (per-image BN-statistics matching) as a fixed training set, then the "
         "shared QAT loop: the `qat` layout (every Conv/Linear at W bits, activations after every ReLU, BN "
         "kept with frozen statistics), a warm-up of EMA activation ranges (4 epochs, no training; then "
         "frozen), then KD from the FP model (alpha 20, T 20, batchmean KL), SGD-Nesterov (momentum 0.9, "
         "weight decay 1e-4) with a cosine lr, per-channel min-max weights recomputed every step, IntraQ's "
         "random-resized-crop + flip on the synthetic images; last epoch reported. The baseline the QAT "
         "methods (IntraQ, HAST, SynQ) are ablations of. paper: 5,120 images, 151 x 200 steps of batch 256, "
         "lr 1e-4 [code: zysxmu/IntraQ]; zsq uses lr 3e-5 in every budget: the official 1e-4 collapses this "
         "loop (10.8% test top-1 at the default budget), 3e-5 was the best of 1e-4 / 3e-5 / 1e-5 / 3e-6 on a "
         "validation split at W4A4 and W3A3 (bench/qat_validation.py). default: 5,120 images, 4 x 250 steps "
         "of batch 256 (20 warm-up steps), ~25 min on 2 cores."),
)


# -- the QAT methods (noise-optimization family): data + student terms on the same loop -------------------

#: the shared loop's loss and optimiser values (qat-zeroq's), listed in every recipe (``zsq methods``, zsq.json)
_KD = {k: RECIPES["qat-zeroq"].hparams[k] for k in ("lr", "kd_weight", "temperature", "ema_epochs")}
_LOOP_DOC = ("Fine-tuning: the shared QAT loop of qat-zeroq (the `qat` layout, 4 epochs of EMA activation ranges, "
             "KD alpha 20 / T 20 batchmean, SGD-Nesterov, cosine lr, crop + flip)")
_BUDGET_DOC = "default: 5,120 images and qat-zeroq's 4 x 250 steps of batch 256 (one equal budget)."
_LOOP_AND_BUDGET_DOC = f" {_LOOP_DOC}. {_BUDGET_DOC}"  # appended to each method's doc


recipe(
    "intraq", family="noise-optimization", kind="QAT", protocol="qat", synth="intraq", quant="qat-kd",
    paper="IntraQ: Learning Synthetic Images with Intra-Class Heterogeneity (Zhong et al., CVPR 2022)",
    hparams={**_KD, "ce_weight": 1.0, "ce_target": "labels"},
    budgets=_budgets(),
    doc=("IntraQ's data (BNS + soft target + marginal distance to class centres, random-resized crops) and its "
         "student loss CE(Q(x), y) on the synthesis labels + KD [code: zysxmu/IntraQ trainer_direct.py]. "
         "paper: 151 x 200 steps of batch 256, lr 1e-4 (CIFAR; zsq uses qat-zeroq's 3e-5).") + _LOOP_AND_BUDGET_DOC,
)

recipe(
    "hast", family="noise-optimization", kind="QAT", protocol="qat", synth="hast", quant="qat-kd",
    paper="HAST: Hard Sample Matters a Lot in Zero-Shot Quantization (Li et al., CVPR 2023)",
    hparams={**_KD, "lr": 1e-5, "ce_weight": 0.0, "fa_weight": 1000.0, "adv_eps": 0.01, "adv_weight": 1.0},
    budgets=_budgets(paper_quant={"batch_size": 64}),
    doc=("HAST's data (BNS + focal CE keeping hard samples hard, beta 10, gamma 2) and its student loss: KD + "
         "1000 x feature alignment (L2-normalised channel attention of every residual branch), plus the same loss on "
         "x' = x + 0.01 sign(grad_x), no CE [code: lihuantong/HAST trainer_direct.py, cifar10_resnet20.hocon]. "
         "lr 1e-5 (HAST's CIFAR-10 value: its loss is twice the KD's, and at 1e-4 it diverges within steps). "
         "paper: 151 x 200 steps of batch 64 (CIFAR-10).") + _LOOP_AND_BUDGET_DOC,
)

recipe(
    "synq", family="noise-optimization", kind="QAT", protocol="qat", synth="hast", quant="qat-kd",
    paper="SynQ: Accurate Zero-shot Quantization by Synthesis-aware Fine-tuning (Kim et al., ICLR 2025)",
    hparams={**_KD, "lr": 1e-5, "ce_weight": 5.0, "ce_target": "labels", "ce_select": "easy", "ce_tau": 0.5,
             "fa_weight": 1000.0, "adv_eps": 0.01, "adv_weight": 1.0, "lpf_d0": 80.0, "cam_weight": 200.0},
    budgets=_budgets(paper_quant={"epochs": 100}, beta=0.1, gamma=0.5),
    doc=("SynQ on HAST-style data with its focal CE at beta 0.1, gamma 0.5 (run_generate_*.sh): a Gaussian low-pass "
         "filter on every batch (D0 80 at 224 px, scaled: 11.4 on 32 px), Grad-CAM alignment (200), CE on the "
         "synthesis labels only for samples the teacher finds easy (1 - p_y < 0.5, weight 5), HAST's KD + feature "
         "alignment (1000, HAST's CIFAR value: SynQ released only ImageNet's 4000) and perturbation branch (eps 0.01) "
         "[code: snudm-starlab/SynQ trainer_direct.py, main_direct.py argparse defaults; the ImageNet run script uses "
         "CE 0.5, CAM 50; the paper searched tau, D0, CE and CAM weights per setting, CIFAR values unpublished]; "
         "lr 1e-5 as HAST (SynQ's CIFAR lr unpublished). paper: 100 x 200 steps of batch 256 (SynQ's CIFAR epochs "
         "and batch).") + _LOOP_AND_BUDGET_DOC,
)

recipe(
    "plf", family="noise-optimization", kind="QAT", protocol="qat", synth="hast", quant="qat-kd",
    paper="PLF: Data-Free Quantization via Pseudo-label Filtering (Fan et al., CVPR 2024)",
    hparams={**_KD, "ce_weight": 1.0, "ce_target": "labels", "ce_select": "reliable", "ce_tau": 0.5},
    budgets=_budgets(),
    doc=("PLF (no public code; details unverified, zsq's reading): HAST's data (the hard-sample set where label "
         "reliability varies most); before fine-tuning each image's reliability = the teacher's self-entropy / log C; "
         "the CE on the synthesis label (hard pseudo-label) keeps the images below 0.5 whose teacher argmax agrees "
         "with the label, KD (soft pseudo-label) keeps all. paper: IntraQ's 151 x 200 steps of batch 256 "
         "(lr: qat-zeroq's 3e-5) "
         "(unverified).") + _LOOP_AND_BUDGET_DOC,
)

recipe(
    "texq", family="noise-optimization", kind="QAT", protocol="qat", synth="texq", quant="qat-kd",
    paper=("TexQ: Zero-shot Network Quantization with Texture Feature Distribution Calibration "
           "(Chen et al., NeurIPS 2023)"),
    hparams={**_KD, "ce_weight": 0.0, "kd_weight": 10.0, "mixup_weight": 10.0, "mixup_alpha": 1.0, "clip_images": True},
    budgets=_budgets(),
    doc=("TexQ (no public code; details unverified): texture-calibrated data (Laws texture energy of class "
         "calibration centres) and KD plus mixup-based KD: KD on x_mix = lam x + (1 - lam) x[perm], lam ~ Beta(1, 1) "
         "per batch. The two KD terms share one KD-sized weight (10 + 10: KD 20 + mixup 20 doubles the step the lr "
         "3e-5 was chosen for and collapsed, 54.9 at W4A4) and the set is clamped to the valid pixel range before "
         "training (clip_images; the unclipped texq set reaches |x| ~ 9): both chosen on the validation split "
         "(bench/qat_validation.py; W4A4, quarter budget: 67.4 unclipped KD only, 67.7 unclipped 10 + 10, 73.6 "
         "clipped KD only, 72.9 clipped 10 + 10 -- mixup KD is neutral within noise there and kept as the paper's "
         "component). paper: IntraQ's 151 x 200 steps of batch 256 (lr: qat-zeroq's 3e-5; unverified).")
        + _LOOP_AND_BUDGET_DOC,
)

recipe(
    "deepinversion", family="noise-optimization", kind="QAT", protocol="qat", synth="deepinversion", quant="qat-kd",
    paper="DeepInversion: Dreaming to Distill (Yin et al., CVPR 2020)",
    hparams={**_KD, "ce_weight": 0.0},
    budgets=_budgets(),
    doc=("DeepInversion's data (batch BN statistics with unsquared L2, CE to random labels, TV and L2 image priors, "
         "jitter + flip) [code: NVlabs/DeepInversion] distilled into the quantized model by KD (the data-free KD "
         "the survey lists under QAT). paper: 5,120 images and IntraQ's 151 x 200 steps of batch 256 (the QAT "
         "lineage's fixed-set size; DeepInversion itself reports no quantization fine-tuning).") + _LOOP_AND_BUDGET_DOC,
)

recipe(
    "gznq", family="noise-optimization", kind="QAT", protocol="qat", synth="gznq", quant="qat-kd",
    paper="GZNQ: Generative Zero-shot Network Quantization (He et al., CVPRW 2021)",
    hparams={**_KD, "ce_weight": 0.0},
    budgets=_budgets(),
    doc=("GZNQ (no public code; details unverified): BN statistics matched as per-channel Gaussians (KL) + CE to "
         "the synthesis labels, then distillation fine-tuning (KD). paper: 5,120 images and IntraQ's 151 x 200 "
         "steps of batch 256 (unverified).") + _LOOP_AND_BUDGET_DOC,
)
