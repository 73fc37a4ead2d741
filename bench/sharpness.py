"""Sharpness of quantized models calibrated on different synthetic data (issue 6, part 3).

One quantizer for every source: the ``genie`` recipe (Genie-M reconstruction, protocol
``genie-native``) of ``cifar10_resnet20``, calibrated on the synthetic set of each source (``noise``
= the ``gaussian`` synthesizer, ``zeroq``, ``genie``, ``sadag``) made (or reused from ZSQ_CACHE) with
the same image count: the genie synthesizer's count at the budget (256 at ``default``, 32 at
``smoke``). Sharpness is measured on a fixed real set, the first 100 images per class of
``cifar10-jpeg/train.tar`` (1,000 images): the cross-entropy L0 of the quantized model, then for each
relative radius rho and K = 8 fixed random directions the increase L(w + d) - L0, where ``d`` perturbs
the *dequantized* weight every quantized layer computes with (activation quantizers unchanged) by
Gaussian noise scaled per output channel to ``rho * ||w_c|| / sqrt(fan_in)`` (so ``||d_c|| ~ rho
||w_c||``). Direction j is the same N(0, I) draw for every rho and every model. (Budget ``smoke``, for
tests: 20 images per class and K = 2.)

One JSON per experiment (source, bits, seed, budget) in ``bench/runs/sharpness/`` (finished ones are
skipped: resumable), and PNGs beside them: ``sharpness_<bits>.png`` (mean loss increase +- std over
the K directions against rho, one line per source; beside it the same with the activation quantizers
switched off, ``sharpness_weights_only`` in the JSON: at 4-bit activations even a 1e-7 relative weight
change flips a few activation roundings whose effect cascades, so the left panel holds that effect too)
and ``images_<source>.png`` (the first 64 synthetic images of each source).

    ZSQ_HOME=../shared/assets ZSQ_CACHE=... python bench/sharpness.py [NAME ...] [--sources noise,zeroq,genie,sadag]
        [--bits W4A4,W3A3] [--seed 0] [--budget default|smoke] [--out-dir DIR]
    python bench/sharpness.py --list | --table | --plots-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import valsplit
from results.sharpness import sharpness_rows

HERE = Path(__file__).resolve().parent
OUT = HERE / "runs" / "sharpness"
MODEL = "cifar10_resnet20"
SOURCES = {"noise": "gaussian", "zeroq": "zeroq", "genie": "genie", "sadag": "sadag"}  # source -> synthesizer
RHOS = (0.005, 0.01, 0.02, 0.05, 0.1)  # small radii are dominated by activation-rounding flips at A4
K = 8
REAL_N = 1000  # the first 100 images per class of train.tar
SMOKE_REAL_N, SMOKE_K = 200, 2  # budget smoke (tests, CI): 20 images per class, 2 directions


def real_set(model, n: int = REAL_N):
    """The fixed real set: the first ``n // 10`` images of every class of train.tar, for ``model``."""
    from zsq.data.eval import open_dataset
    from zsq.record import model_info

    return open_dataset(Path(os.environ["ZSQ_HOME"]) / "cifar10-jpeg" / "train.tar", model_info(model).preprocess,
                        limit=n)


def _loss(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and top-1 (%) of ``model`` on ``(x, y)``."""
    tot, correct = 0.0, 0
    for s in range(0, len(x), batch_size):
        out = model(x[s:s + batch_size])
        tot += float(F.cross_entropy(out, y[s:s + batch_size], reduction="sum"))
        correct += int((out.argmax(1) == y[s:s + batch_size]).sum())
    return tot / len(x), 100.0 * correct / len(x)


def sharpness(qmodel, images: torch.Tensor, labels: torch.Tensor, rhos=RHOS, k: int = K, seed: int = 0,
              batch_size: int = 250, act_quant: bool = True) -> dict:
    """Loss increase of ``qmodel`` on ``(images, labels)`` under random relative perturbations of its
    effective (dequantized) weights, ``k`` directions per rho. Each quantized layer's ``qweight()`` is
    shadowed by an instance attribute returning the frozen ``wq(weight)`` plus the perturbation, so no
    parameter, buffer or quantizer is touched and removing the attribute restores the model exactly.
    ``act_quant=False``: the same with every activation quantizer switched off meanwhile (weights only)."""
    from zsq.quant.modules import QUANT_LAYERS, quantizers

    layers = [m for m in qmodel.modules() if isinstance(m, QUANT_LAYERS)]
    acts = [q for _, q in quantizers(qmodel, "act")]
    modes = [q.mode for q in acts]
    was_training = qmodel.training
    qmodel.eval()
    deltas: list[list[float]] = []
    try:
        for q in acts if not act_quant else ():
            q.mode = "off"
        with torch.inference_mode():
            w_eff = [m.qweight() for m in layers]  # the weights the forward computes with
            loss0, top1 = _loss(qmodel, images, labels, batch_size)
            for rho in rhos:
                row = []
                for j in range(k):
                    g = torch.Generator().manual_seed(1000 * seed + j)  # direction j: the same for every rho
                    for m, w in zip(layers, w_eff):
                        sigma = rho * w.flatten(1).norm(dim=1) / math.sqrt(w[0].numel())
                        pert = w + torch.randn(w.shape, generator=g) * sigma.view(-1, *[1] * (w.dim() - 1))
                        m.qweight = lambda p=pert: p
                    row.append(_loss(qmodel, images, labels, batch_size)[0] - loss0)
                deltas.append(row)
    finally:
        for m in layers:
            m.__dict__.pop("qweight", None)
        for q, mode in zip(acts, modes):
            q.mode = mode
        qmodel.train(was_training)
    return {"rho": list(rhos), "mean": [statistics.fmean(r) for r in deltas],
            "std": [statistics.stdev(r) if len(r) > 1 else 0.0 for r in deltas], "deltas": deltas,
            "loss0": loss0, "top1": top1, "n": len(images), "k": k, "layers": len(layers)}


def _bits(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"W(\d+)A(\d+)", s.strip())
    if not m:
        raise SystemExit(f"--bits expects e.g. W4A4, got '{s}'")
    return int(m[1]), int(m[2])


def experiments(args) -> dict[str, tuple]:
    return {f"{src}__{b}__{args.budget}__s{args.seed}": (src, _bits(b), args.seed, args.budget)
            for b in args.bits for src in args.sources}


def run(spec: tuple) -> dict:
    from zsq.api import quantize
    from zsq.models import load_model
    from zsq.record import record_of
    from zsq.synth import SYNTHESIZERS, synthesize

    source, (w, a), seed, budget = spec
    model = load_model(MODEL)
    n = SYNTHESIZERS["genie"].Config.for_budget(budget).n_images  # one image count for every source
    t0 = time.perf_counter()
    sset = synthesize(model, SOURCES[source], budget=budget, seed=seed, n_images=n, progress=False)
    t1 = time.perf_counter()
    q = quantize(model, "genie", w, a, seed=seed, budget=budget, synthetic=str(sset.dir), progress=False)
    t2 = time.perf_counter()
    smoke = budget == "smoke"
    x, y = real_set(model, SMOKE_REAL_N if smoke else REAL_N).tensors()
    sh = sharpness(q, x, y, k=SMOKE_K if smoke else K)
    sh_w = sharpness(q, x, y, k=SMOKE_K if smoke else K, act_quant=False)
    return {"source": source, "synth": SOURCES[source], "recipe": "genie", "protocol": record_of(q).result["protocol"],
            "bits": f"W{w}A{a}", "seed": seed, "budget": budget, "model": MODEL,
            "synthetic": {"dir": str(sset.dir), "sha256": sset.sha256, "n_images": int(sset.n_images),
                          "synth_wall_s": sset.meta.get("wall_s")},
            "sharpness": sh, "sharpness_weights_only": sh_w,
            "wall_s": {"synthesis": round(t1 - t0, 1), "quantize": round(t2 - t1, 1),
                       "sharpness": round(time.perf_counter() - t2, 1)},
            "threads": torch.get_num_threads(), **valsplit.env_fields()}


def _records(out: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]


def plots(out: Path, args) -> list[Path]:
    """Draw ``sharpness_<bits>.png`` and ``images_<source>.png`` from the JSONs of ``args``' budget and seed."""
    from zsq.data.shards import SyntheticSet
    from zsq.models import load_model
    from zsq.record import model_info
    from zsq.report import images_png, pyplot, save_figure

    recs = [r for r in _records(out) if r["budget"] == args.budget and r["seed"] == args.seed]
    order = {s: i for i, s in enumerate(SOURCES)}
    written = []
    for bits in args.bits:
        rs = sorted((r for r in recs if r["bits"] == bits), key=lambda r: order.get(r["source"], 99))
        if not rs:
            continue
        panels = [("sharpness", "activations quantized (as deployed)")]
        if all("sharpness_weights_only" in r for r in rs):
            panels.append(("sharpness_weights_only", "activation quantizers off (weights only)"))
        plt = pyplot()
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
        for ax, (key, what) in zip(axes[0], panels):
            for i, r in enumerate(rs):
                s = r[key]
                shift = 1 + 0.04 * (i - (len(rs) - 1) / 2)  # spread the error bars of one rho apart
                ax.errorbar([x * shift for x in s["rho"]], s["mean"], yerr=s["std"], marker="o", capsize=3,
                            label=f"{r['source']} (L0 {s['loss0']:.3f}, top-1 {s['top1']:.1f}%)")
            s = rs[0][key]
            ax.set_xscale("log")
            ax.set_xticks(s["rho"], [f"{x:g}" for x in s["rho"]])
            ax.minorticks_off()
            ax.axhline(0.0, color="0.5", lw=0.8)
            ax.set_xlabel("rho (relative weight perturbation per output channel)")
            ax.set_ylabel(f"loss increase L(w+d) - L0 (mean +- std, K={s['k']})")
            ax.set_title(f"{what}: cross-entropy on {s['n']} train images", fontsize=9)
            ax.legend(fontsize=8, title="calibration data", title_fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{MODEL}, genie-m on each source's data, {bits}, budget {args.budget}, seed {args.seed}",
                     fontsize=10)
        save_figure(plt, fig, out / f"sharpness_{bits}.png")
        written.append(out / f"sharpness_{bits}.png")
    pre = None
    for source in [s for s in SOURCES if s in args.sources]:
        r = next((r for r in recs if r["source"] == source and Path(r["synthetic"]["dir"]).is_dir()), None)
        if r is None:
            continue
        pre = pre or model_info(load_model(MODEL)).preprocess
        images_png(SyntheticSet.load(r["synthetic"]["dir"]).images, pre, out / f"images_{source}.png")
        written.append(out / f"images_{source}.png")
    return written


def table(out: Path) -> str:
    return "\n".join(sharpness_rows(_records(out)))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sharpness.py", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="experiments to run (default: all of the selection)")
    p.add_argument("--sources", default=",".join(SOURCES), type=lambda s: s.split(","))
    p.add_argument("--bits", default="W4A4", type=lambda s: s.split(","))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default="default")
    p.add_argument("--out-dir", type=Path, default=OUT)
    p.add_argument("--list", action="store_true", help="print the experiments and exit")
    p.add_argument("--table", action="store_true", help="print the table of finished experiments and exit")
    p.add_argument("--plots-only", action="store_true", help="redraw the PNGs from the existing JSONs")
    args = p.parse_args(argv)
    bad = [s for s in args.sources if s not in SOURCES]
    if bad:
        print(f"unknown source {bad[0]} (choose from {', '.join(SOURCES)})", file=sys.stderr)
        return 2
    exps = experiments(args)
    if args.list:
        print("\n".join(exps))
        return 0
    out = args.out_dir
    if args.table:
        print(table(out))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if not args.plots_only:
        rc = valsplit.run_pending(args.names or list(exps), exps, lambda name: run(exps[name]), out,
                                  lambda d: f"L0 {d['sharpness']['loss0']:.4f}, top-1 {d['sharpness']['top1']:.1f}, "
                                  "dL " + ", ".join(f"{m:.4f}" for m in d["sharpness"]["mean"])
                                  + f" ({sum(d['wall_s'].values()):.0f} s)")
        if rc:
            return rc
    for f in plots(out, args):
        print(f"wrote {f}")
    print(table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
