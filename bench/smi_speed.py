"""SMI's speed-up: time per iteration of dense vs sparse inversion on cifar10_vit_tiny (issue 11).

Two measurements, both with 32 images of 32 x 32 in bf16 autocast like the presets, weights randomly
initialised (speed does not depend on them):

1. **interleaved per-iteration times** (the robust one on a shared machine): one inversion step
   (kept-token forward, CE + TV_l2 loss, backward, Adam step, clamp) at each token count of the
   official schedule -- 64 patches (dense), then 44, 30, 21, 14 after dropping 30 % at iterations
   50 / 100 / 200 / 300 -- timed round-robin ``--reps`` times, medians kept; from them the time of a
   whole run (``default`` 500 and ``paper`` 4,000 iterations), sparse vs dense;
2. **end-to-end**: the ``smi`` synthesizer itself with that schedule and dense (``prune_its=""``,
   the code's ``--prune_it -1``) for ``--iters`` iterations, run in the order sparse, dense, dense,
   sparse and summed (load drift cancels to first order).

    nice -n 19 env OMP_NUM_THREADS=1 python bench/smi_speed.py [--iters 320] [--reps 15] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import zsq
from zsq.models.vit import VIT_TINY, VisionTransformer
from zsq.synth import batch_generator
from zsq.synth.losses import tv_loss
from zsq.synth.vit import SMI

SCHEDULE = "50,100,200,300"
TOKENS = (64, 44, 30, 21, 14)  # patches kept in each phase: int(k * 0.7) after each drop
PHASE_ITERS = (50, 50, 100, 100)  # iterations spent at 64, 44, 30, 21 patches; the rest at 14


def step_times(model, batch: int, reps: int) -> dict[int, float]:
    """Median seconds of one inversion step at each kept-patch count, timed round-robin."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).requires_grad_(True)
    y = torch.randint(0, 10, (batch,), generator=gen)
    opt = torch.optim.Adam([x], lr=0.25, betas=(0.5, 0.99))
    keeps = {k: torch.stack([torch.randperm(64, generator=gen)[:k] for _ in range(batch)]) for k in TOKENS}
    times: dict[int, list[float]] = {k: [] for k in TOKENS}
    for rep in range(reps + 1):
        for k in TOKENS:
            t = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16):
                out = model(x) if k == 64 else model(x, keep=keeps[k])
            loss = F.cross_entropy(out.float(), y) + 1e-4 * tv_loss(x, "l2")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(-2.2, 2.7)
            if rep:  # the first round warms up
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def run_times(t: dict[int, float], n: int) -> dict[str, float]:
    """Seconds of an ``n``-iteration run, sparse (official schedule) vs dense, from per-step times."""
    sparse, left = 0.0, n
    for k, m in zip(TOKENS, PHASE_ITERS):
        sparse += min(m, left) * t[k]
        left -= min(m, left)
    sparse += left * t[TOKENS[-1]]
    dense = n * t[64]
    return {"iters": n, "sparse_s": round(sparse, 1), "dense_s": round(dense, 1), "speedup": round(dense / sparse, 2)}


def synth_seconds(model, iters: int, prune_its: str, batch: int) -> float:
    synth = SMI.from_budget("paper", iters=iters, prune_its=prune_its, n_images=batch, batch_size=batch)
    t = time.perf_counter()
    synth.make_batch(model, 0, batch_generator(0, 0), batch_size=batch, image_shape=(3, 32, 32))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=320, help="end-to-end run length (0: skip)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = zsq.load_model(VisionTransformer(VIT_TINY))
    for p in model.parameters():
        p.requires_grad_(False)
    t = step_times(model, args.batch, args.reps)
    result = {
        "model": "cifar10_vit_tiny (random init)", "batch": args.batch, "threads": args.threads, "precision": "bf16",
        "step_s": {f"{k} patches": round(v, 4) for k, v in t.items()},
        "step_ratio_vs_dense": {f"{k} patches": round(t[64] / v, 2) for k, v in t.items()},
        "projected": [run_times(t, 500), run_times(t, 4000)],
    }
    if args.iters:
        order = ("sparse", "dense", "dense", "sparse")
        secs = {"sparse": 0.0, "dense": 0.0}
        for kind in order:
            secs[kind] += synth_seconds(model, args.iters, SCHEDULE if kind == "sparse" else "", args.batch)
        result["end_to_end"] = {"iters": args.iters, "runs_each": 2, "sparse_s": round(secs["sparse"], 1),
                                "dense_s": round(secs["dense"], 1), "speedup": round(secs["dense"] / secs["sparse"], 2)}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
