"""Choose the ViT recipes' weight and activation ranges (issue 11) on a validation split, never on the test set.

The official PSAQ-ViT / SMI quantizer takes per-channel **min-max** weight ranges; zsq also has the
L_p-search ranges BRECQ and Genie initialise with (``--set w_observer=mse``). Each experiment =
(recipe, weight observer, bits, seed): the recipe's synthetic set (made or reused from ZSQ_CACHE,
`default` budget), the recipe's quantizer with ``w_observer`` overridden, top-1 of
``cifar10_vit_tiny`` on the validation split (the first 500 images per class of
``cifar10-jpeg/train.tar``, see bench/valsplit.py). One JSON per experiment in
``bench/runs/vit-val/``; finished experiments are skipped (resumable).

    ZSQ_HOME=../shared/assets ZSQ_CACHE=... python bench/vit_validation.py [NAME ...]
    python bench/vit_validation.py --list | --table
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import valsplit

HERE = Path(__file__).resolve().parent
OUT = HERE / "runs" / "vit-val"

OBSERVERS = ("minmax", "mse")
VIT = ("psaq-vit", "psaq-vit-v2", "smi", "clamp-vit")
# (recipe, weight observer, activation observer, bits, seed): first the weight range (psaq-vit, smi), then the
# activation range of every recipe at W4A8 and W4A4 (min-max, the official code's, vs the MSE search)
EXPERIMENTS = {f"{r}__w{obs}__W{w}A{a}__s0": (r, obs, "minmax", (w, a), 0)
               for r in ("psaq-vit", "smi") for (w, a) in ((4, 8), (8, 8)) for obs in OBSERVERS}
EXPERIMENTS.update({f"{r}__wminmax{'' if aobs == 'minmax' else '__a' + aobs}__W{w}A{a}__s0":
                    (r, "minmax", aobs, (w, a), 0) for r in VIT for (w, a) in ((4, 8), (4, 4)) for aobs in OBSERVERS})


def run(name: str) -> dict:
    from zsq.api import evaluate, quantize
    from zsq.models.zoo import load_model

    r, obs, aobs, (w, a), seed = EXPERIMENTS[name]
    model = load_model("cifar10_vit_tiny")
    t0 = time.perf_counter()
    q = quantize(model, r, w, a, seed=seed, hparams={"w_observer": obs, "a_observer": aobs}, progress=False)
    wall = time.perf_counter() - t0
    acc = evaluate(q, valsplit.val_dataset(model), progress=False)
    return {"name": name, "recipe": r, "w_observer": obs, "a_observer": aobs, "bits": f"W{w}A{a}", "seed": seed,
            "val_top1": acc["top1"], "val_n": acc["n"], "wall_s": round(wall, 1), **valsplit.env_fields()}


def table() -> str:
    rows = ["| recipe | weight range | activation range | bits | seed | val top-1 | wall s (synthesis + calibration) |",
            "|---|---|---|---|---|---|---|"]
    for f in sorted(OUT.glob("*.json")):
        d = json.loads(f.read_text())
        rows.append(f"| {d['recipe']} | {d['w_observer']} | {d.get('a_observer', 'minmax')} | {d['bits']} | "
                    f"{d['seed']} | {d['val_top1']:.2f} | {d['wall_s']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(valsplit.main(sys.argv[1:], EXPERIMENTS, run, OUT, table,
                                   lambda d: f"val top-1 {d['val_top1']:.2f} ({d['wall_s']} s)"))
