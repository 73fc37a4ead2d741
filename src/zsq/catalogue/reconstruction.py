"""Block-reconstruction recipes (issue 5): a synthesizer's images (Genie-D unless the paper made its own),
then AdaRound / BRECQ / QDrop / Genie-M reconstruction (the quantizers of :mod:`zsq.ptq.quantizers`).

Every entry has the same shape (:func:`zsq.recipes.recipe`); the budgets size the quantizer (the
synthesizer's own presets size the data).
"""

from __future__ import annotations

from ..ptq import quantizers as _quantizers  # noqa: F401  (registers adaround, brecq, qdrop, genie-m)
from ..recipes import RECIPES, recipe

# Budgets of the reconstruction recipes (quantizer side; the synthesizer's own presets size the data):
#   paper   = the papers' defaults: 20,000 steps per block, batch 32 (Genie-D: 1,024 images x 4,000 iters)
#   default = sized for 2 CPU cores: synthesis + the first bit setting of ResNet-20 within 800 s:
#             3,000 steps per block of batch 8, fp32. Batch 8 is what the official Genie code
#             actually runs on 256 images (its sampler is randperm(N).view(32, -1): N / 32 images
#             per step); at batch 32 a step costs ~25 ms instead of ~15 ms here and ResNet-20's 11
#             units alone take ~700 s. Validation split (bench/genie_validation.py), W3A3: batch 8 x
#             3,000 steps 81.86 vs 81.42 at 1,000 steps. bf16 / channels_last measured at batch 8:
#             < 1.2x faster (13-16 vs 15-17 ms per step), so fp32.
#   smoke   = seconds, for CI
RECON_BUDGETS = {
    "smoke": {"quant": {"iters": 20, "batch_size": 16}},
    "default": {"quant": {"iters": 3000, "batch_size": 8, "precision": "fp32"}},
    "paper": {"quant": {"iters": 20000}},
}

recipe(
    "genie", family="noise-optimization", kind="PTQ", protocol="genie-native", synth="genie", quant="genie-m",
    paper="Genie: Show Me the Data for Quantization (Jeon, Lee, Kim; CVPR 2023)",
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets=RECON_BUDGETS,
    doc=("Genie-D data (a fresh generator + latents per batch of 128, Genie's BNS loss with swing convolution; "
         "1,024 images x 4,000 iterations in the paper) and Genie-M reconstruction (QDrop + AdaRound + learnt "
         "weight steps, 20,000 steps per block) [code: SamsungLabs/Genie]. Native protocol = the official code's "
         "convention (genie-native: BN unfolded, quantizers at layer inputs, shortcuts quantized); publish `ptq` "
         "numbers beside it. default budget: 256 images x 300 iterations (bf16, compressed schedules), 3,000 steps per "
         "block of batch 8 (fp32; the official code's effective batch for 256 images)."),
)

recipe(
    "sadag", family="noise-optimization", kind="PTQ", protocol="genie-native", synth="sadag", quant="genie-m",
    paper="Sharpness-Aware Data Generation for Zero-shot Quantization (Hoang-Anh, Pham, Le, Cai, Do; ICML 2024)",
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets=RECON_BUDGETS,
    doc=("Genie-D data plus SADAG's gradient-matching term (cosine between each image's and its Gaussian "
         "neighbours' per-sample gradients of the FP-vs-W4A4 reconstruction loss w.r.t. the last block's "
         "weights, second order into the generator), then Genie-M reconstruction as in the genie recipe. No "
         "public code: neighbours, rho, weight and schedule are zsq's choices (zsq.synth.sadag). default "
         "budget: Genie-D's default with the term (weight 0.03, chosen on a validation split) every 8th iteration from "
         "25% on, 3,000 steps per block."),
)

recipe(
    "brecq", family="reconstruction", kind="PTQ", protocol="ptq", synth="genie", quant="brecq",
    paper="BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction (Li et al., ICLR 2021)",
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets={**RECON_BUDGETS, "smoke": {"quant": {"iters": 20, "batch_size": 16, "iters_a": 10}},
             "default": {"quant": {"iters": 2000, "iters_a": 500, "precision": "fp32"}}},
    doc=("BRECQ's sequential block reconstruction (weights, then activation steps) on zero-shot data. The "
         "synthesizer is Genie-D (the Genie paper's zero-shot BRECQ baseline uses distilled data; Genie-D is the "
         "strongest BNS synthesizer here); override with --synth. paper: 20,000 + 5,000 steps per block."),
)

recipe(
    "mixmix", family="noise-optimization", kind="PTQ", protocol="ptq", synth="mixmix", quant="brecq",
    paper="MixMix: All You Need for Data-Free Compression Are Feature and Data Mixing (Li et al., ICCV 2021)",
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets={**RECIPES["brecq"].budgets, "default": {"n_images": 256, **RECIPES["brecq"].budgets["default"]}},
    doc=("MixMix's data (feature mixing: BN statistics of several models; data mixing: CutMix of synthesized images "
         "with mixed labels; no public code, details unverified) reconstructed with BRECQ as in the paper (first / "
         "last layer 8-bit, `ptq`). Budgets: the brecq recipe's; `paper` 1,024 images, `default` 256 (genie's)."),
)

recipe(
    "qdrop", family="reconstruction", kind="PTQ", protocol="ptq", synth="genie", quant="qdrop",
    paper=("QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization "
           "(Wei et al., ICLR 2022)"),
    hparams={"w_observer": "mse", "a_observer": "mse"},
    budgets=RECON_BUDGETS,
    doc=("QDrop's joint block reconstruction with random quantization dropping on Genie-D data (override with "
         "--synth). paper: 20,000 steps per block, batch 32, 1,024 images."),
)
