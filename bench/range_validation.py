"""The validation-split evidence for two range defaults that were chosen by hand before any record was kept.

* ``zsq.ptq.bn_ranges.DEFAULT_K``: the ``k`` of the synthesis-free recipes' activation ranges
  (``mean + k * std`` of the BN pre-activation) per bit width. Experiments ``squant__k<k>__W<b>A<b>``:
  ResNet-20, ``squant``, ``fixed``, seed 0, one ``k`` for every activation quantizer (``--set k=...``).
* the ``zeroq`` recipe's ``default`` / ``smoke`` weight ranges: the per-channel L_p search (``mse``
  observer; p = 2.4, BRECQ's exponent, not tuned here) instead of the official min-max. Experiments
  ``zeroq__w<observer>__W4A<a>``: ResNet-20, ``zeroq``, ``ptq``, default budget, seed 0, the same
  synthetic set for both observers.

Top-1 on the validation split (the first 500 images per class of ``cifar10-jpeg/train.tar``, images the
model was trained on, never the test set; bench/valsplit.py), with the agreement and KL to the FP
model beside it. One JSON per experiment in ``bench/runs/range-val/``; finished ones are skipped.

    ZSQ_HOME=../shared/assets ZSQ_CACHE=... ZSQ_THREADS=1 python bench/range_validation.py [NAME ...]
    python bench/range_validation.py --list | --table
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import valsplit

HERE = Path(__file__).resolve().parent
OUT = HERE / "runs" / "range-val"

#: the k values tried per bit width (those the bn_ranges docstring reported when the defaults were set)
K_GRID = {8: (4.0, 6.0, 8.0, 10.0, 14.0), 4: (3.0, 3.5, 4.0, 4.5, 5.0), 3: (2.5, 3.0, 3.5, 4.0)}
EXPERIMENTS: dict[str, tuple] = {f"squant__k{k:g}__W{b}A{b}": ("squant", "fixed", (b, b), {"k": k})
                                 for b, ks in K_GRID.items() for k in ks}
EXPERIMENTS.update({f"zeroq__w{obs}__W4A{a}": ("zeroq", "ptq", (4, a), {"w_observer": obs})
                    for a in (8, 4) for obs in ("minmax", "mse")})


def run(name: str) -> dict:
    from zsq.api import quantize
    from zsq.models.zoo import load_model

    recipe, proto, (w, a), hp = EXPERIMENTS[name]
    model = load_model("cifar10_resnet20")
    t0 = time.perf_counter()
    q = quantize(model, recipe, w, a, protocol=proto, seed=0, hparams=hp, progress=False)
    wall = time.perf_counter() - t0
    fid = valsplit.fidelity(model, q, valsplit.val_dataset(model))
    return {"name": name, "model": "cifar10_resnet20", "recipe": recipe, "protocol": proto, "bits": f"W{w}A{a}",
            "seed": 0, "budget": "default", "hparams": hp, **fid, "wall_s": round(wall, 1), **valsplit.env_fields()}


def load() -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(OUT.glob("*.json"))]


def table() -> str:
    rows = ["| recipe | protocol | bits | setting | val top-1 | agree | KL(FP, q) | wall s |",
            "|---|---|---|---|---|---|---|---|"]
    for d in sorted(load(), key=lambda d: (d["recipe"], d["bits"], sorted(d["hparams"].items()))):
        setting = ", ".join(f"{k}={v}" for k, v in d["hparams"].items())
        rows.append(f"| {d['recipe']} | {d['protocol']} | {d['bits']} | {setting} | {d['val_top1']:.2f} | "
                    f"{d['val_agree']:.2f} | {d['val_kl']:.4f} | {d['wall_s']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(valsplit.main(sys.argv[1:], EXPERIMENTS, run, OUT, table,
                                   lambda d: f"val top-1 {d['val_top1']:.2f}, agree {d['val_agree']:.2f}"))
