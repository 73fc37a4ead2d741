"""Shared parts of the validation-split scripts (bench/*_validation.py): choosing a default on data
that is not the test set.

The validation split is the first 500 images of every class of ``cifar10-jpeg/train.tar`` (5,000
images; none is a test image, and no synthesizer ever sees them). Each script names its experiments;
:func:`main` runs the ones asked for (all by default), writes one JSON per experiment under the
script's folder in ``bench/runs/`` and skips an experiment whose JSON exists (resumable), then prints
the script's table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

VAL_N = 5000  # the first 500 images per class of train.tar


def val_dataset(model):
    """The validation split, preprocessed for ``model``."""
    from zsq.data.eval import open_dataset
    from zsq.record import model_info

    home = Path(os.environ["ZSQ_HOME"])
    return open_dataset(home / "cifar10-jpeg" / "train.tar", model_info(model).preprocess, limit=VAL_N)


_FP_CACHE: dict[tuple, torch.Tensor] = {}  # the FP model's log-probabilities per (weights, split), per process


def fidelity(fp, q, dataset, n_hard: int = 1000, batch_size: int = 500) -> dict:
    """Top-1 of ``q`` on the validation split, with label-free and hard-image views beside it.

    The split is training images the FP model was fitted to (its top-1 there is far above the test
    set's), so label top-1 may miss what separates calibration sets on unseen images. Recorded:
    ``val_top1`` / ``val_n``, ``val_agree`` (top-1 agreement with the FP model), ``val_kl`` (mean
    KL(FP || q), nats), and top-1 / agreement on the ``n_hard`` images the FP model is least sure of
    (lowest max-probability). One pass of ``q`` over the split; the FP model's pass is cached per
    process (keyed by its current weights' hash and the split's size), as every experiment of a script
    shares it.
    """
    import torch.nn.functional as F

    from zsq.synth.base import state_dict_sha256

    fp.eval()
    q.eval()
    key = (state_dict_sha256(fp), len(dataset))
    pq, ys = [], []
    with torch.inference_mode():
        for x, y in dataset.batches(batch_size):
            pq.append(F.log_softmax(q(x).float(), 1))
            ys.append(y)
        if key not in _FP_CACHE:
            _FP_CACHE[key] = torch.cat([F.log_softmax(fp(x).float(), 1) for x, _ in dataset.batches(batch_size)])
    pf, pq, y = _FP_CACHE[key], torch.cat(pq), torch.cat(ys)
    agree = pq.argmax(1) == pf.argmax(1)
    hard = pf.max(1).values.argsort()[:n_hard]
    kl = (pf.exp() * (pf - pq)).sum(1)
    return {"val_top1": round(100 * float((pq.argmax(1) == y).float().mean()), 2), "val_n": int(len(y)),
            "val_fp_top1": round(100 * float((pf.argmax(1) == y).float().mean()), 2),
            "val_agree": round(100 * float(agree.float().mean()), 2), "val_kl": round(float(kl.mean()), 4),
            "hard_n": int(len(hard)), "hard_top1": round(100 * float((pq.argmax(1) == y)[hard].float().mean()), 2),
            "hard_fp_top1": round(100 * float((pf.argmax(1) == y)[hard].float().mean()), 2),
            "hard_agree": round(100 * float(agree[hard].float().mean()), 2)}


def env_fields() -> dict:
    """Machine facts recorded with every experiment (peak memory, load, torch version, date)."""
    from zsq.api import peak_rss_mb

    return {"peak_rss_mb": round(peak_rss_mb(), 1), "load_avg": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def synth_recon_summary(d: dict) -> str:
    """The one-line summary of an experiment that made a synthetic set and reconstructed on it."""
    return f"val top-1 {d['val_top1']:.2f} (synth {d['synth_wall_s']} s, recon {d['recon_wall_s']} s)"


def main(argv: list[str], experiments: dict, run: Callable[[str], dict], out: Path, table: Callable[[], str],
         summary: Callable[[dict], str]) -> int:
    if "--list" in argv:
        print("\n".join(experiments))
        return 0
    if "--table" in argv:
        print(table())
        return 0
    rc = run_pending(argv or list(experiments), experiments, run, out, summary)
    if rc == 0:
        print(table())
    return rc


def run_pending(names: list[str], experiments, run: Callable[[str], dict], out: Path,
                summary: Callable[[dict], str]) -> int:
    """Run each named experiment whose ``out/<name>.json`` is missing (resumable), writing the JSON
    atomically; 2 for an unknown name."""
    torch.set_num_threads(int(os.environ.get("ZSQ_THREADS", "2")))
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name not in experiments:
            print(f"unknown experiment {name}", file=sys.stderr)
            return 2
        path = out / f"{name}.json"
        if path.exists():
            continue
        print(f"running {name} ...", flush=True)
        d = run(name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(d, indent=1))
        tmp.replace(path)
        print(f"  {name}: {summary(d)}", flush=True)
    return 0
