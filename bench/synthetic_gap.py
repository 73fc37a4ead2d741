"""Diagnose the synthetic-real gap of Genie-D's images (issue 39 item 1), on training images only.

For a model (``cifar10_resnet20``, ``cifar10_resnet32``) and a synthetic set (Genie-D's, seed 0, made and
cached exactly as ``zsq quantize --recipe genie --protocol genie-native`` makes it: ``zsq.api.synthetic_data``
of the resolved recipe; the default budget's 300 iterations per batch, or ``--synth-set iters=N`` for the
reduced / increased budgets) against real training images (256, from the training images that are **not**
the validation split; the test set is never read), ``diag__*`` experiments record

* per BN layer, the BN-statistics match: Genie's own BNS term (``zsq.synth.losses.BNStatsLoss.preset("genie")``,
  ``layer_losses()``: ``||mean - mu||^2 / C + ||std - sigma||^2 / C``, batch statistics of the BN layer's
  input on batches of 128, the synthesis batch) split into its mean and std parts, averaged over the batches;
* per residual block output (the last one pooled is what the classifier sees), the squared MMD between the set's and the
  real reference's FP features, global-average-pooled to one C-vector per image (:func:`mmd2_rbf`: unbiased,
  Gaussian kernel whose bandwidth is the median pairwise distance of the real reference's pooled features at
  that layer, so every set of one model is measured with the same kernel). The ``real`` row measures a second,
  disjoint 256 real images against the reference: the estimator's floor at this sample size;
* for the whole set: the FP model's mean max-softmax confidence, the entropy of its predicted-class histogram
  (nats; ln 10 = 2.303 is perfectly balanced) with the counts, and the FP top-1 against the intended labels
  where the synthesizer has labels (Genie-D has none: null).

``quant__*`` experiments quantize at W3A3 with the `genie` recipe (Genie-M, ``genie-native``, default budget,
seed 0) on the synthetic set, or on the 256 real reference images (``calib``: the route of the
``calib-real-genie`` runs, on a folder of those images), and record top-1 on the validation split
(``valsplit.fidelity``: the first 500 images per class of ``cifar10-jpeg/train.tar``; never the test set).

The real images: the 45,000 training images outside the validation split, 26 or 25 per class drawn with seed 0
(reference ``A``) and the next 26 or 25 (floor ``B``), written once as lossless PNGs of the decoded pixels
under ``$ZSQ_CACHE/synthetic-gap-real/`` (the same pixels the model sees from the JPEG training tar).

    ZSQ_HOME=../shared/assets ZSQ_CACHE=... ZSQ_THREADS=1 python bench/synthetic_gap.py [NAME ...]
    python bench/synthetic_gap.py --list | --table | --plot

One JSON per experiment under ``bench/runs/synthetic-gap/`` (resumable: a finished experiment is skipped);
``--plot`` (and every run) redraws ``bench/runs/synthetic-gap/synthetic_gap.png``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import valsplit

HERE = Path(__file__).resolve().parent
OUT = HERE / "runs" / "synthetic-gap"
PLOT = OUT / "synthetic_gap.png"

MODELS = ("cifar10_resnet20", "cifar10_resnet32")
DEFAULT_ITERS = 300  # genie's `default` budget: iterations per batch of 128
REAL_N = 256  # images per real set (the synthetic sets' count)
BN_BATCH = 128  # the synthesis batch: BN statistics are measured per batch of this size, as Genie-D matches them
SEED = 0
#: synthesis iterations per batch -> the set name; 300 is the default budget (no override)
SETS = {100: "i100", DEFAULT_ITERS: "i300", 600: "i600"}

EXPERIMENTS: dict[str, tuple] = {}  # name -> (kind, model, iters or None for real, synthesis batches or None = all)
for _m in MODELS:
    EXPERIMENTS[f"diag__{_m}__real"] = ("diag", _m, None, None)
    # batch 0 alone (128 images, the same tensor as the full set's first batch): what a loaded machine could make
    # before the deadline; the full sets' rows follow
    EXPERIMENTS[f"diag__{_m}__i300b0"] = ("diag", _m, 300, (0,))
    EXPERIMENTS[f"diag__{_m}__i100b0"] = ("diag", _m, 100, (0,))
for _m in MODELS:
    EXPERIMENTS[f"diag__{_m}__i300"] = ("diag", _m, 300, None)
    EXPERIMENTS[f"quant__{_m}__i300__W3A3"] = ("quant", _m, 300, None)
    EXPERIMENTS[f"quant__{_m}__real__W3A3"] = ("quant", _m, None, None)
for _m in MODELS:
    EXPERIMENTS[f"diag__{_m}__i100"] = ("diag", _m, 100, None)
for _m in MODELS:  # the increased budget, if the machine allows
    EXPERIMENTS[f"diag__{_m}__i600"] = ("diag", _m, 600, None)


# ----------------------------------------------------------------------------------------------------------
# the distance (one implementation; tests/test_synthetic_gap.py)

def median_bandwidth(x: torch.Tensor) -> float:
    """The median pairwise Euclidean distance between the rows of ``x`` (N, D): the RBF kernel's bandwidth."""
    d = torch.cdist(x.double(), x.double())
    iu = torch.triu_indices(len(x), len(x), 1)
    med = float(d[iu[0], iu[1]].median())
    return med if med > 0 else 1.0


def mmd2_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD between samples ``x`` (N, D) and ``y`` (M, D) under the Gaussian kernel
    ``k(a, b) = exp(-||a - b||^2 / (2 h^2))``; ``h`` = ``bandwidth`` or the median pairwise distance of ``y``
    (the reference). About 0 (it can be slightly negative) for two samples of one distribution, up to 2
    for samples that share nothing. Float64."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("mmd2_rbf needs at least 2 samples on each side")
    h = median_bandwidth(y) if bandwidth is None else float(bandwidth)
    g = 1.0 / (2 * h * h)

    def k(a, b):
        return torch.exp(-g * torch.cdist(a, b).pow(2))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


def class_entropy(pred: torch.Tensor, num_classes: int) -> float:
    """Entropy (nats) of the histogram of predicted classes ``pred``: ln(num_classes) when balanced."""
    p = torch.bincount(pred, minlength=num_classes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


# ----------------------------------------------------------------------------------------------------------
# data

def real_dir(which: str) -> Path:
    """The folder of real reference images ``which`` (``A`` or ``B``), made on first use (see the docstring)."""
    root = Path(os.environ.get("ZSQ_CACHE", Path.home() / ".cache" / "zsq")) / "synthetic-gap-real"
    d = root / f"train-nonval-{REAL_N}-s{SEED}-{which}"
    if not (d / "DONE").exists():
        _write_real(root)
    return d


def _write_real(root: Path) -> None:
    from PIL import Image

    from zsq.data.eval import open_dataset

    ds = open_dataset(Path(os.environ["ZSQ_HOME"]) / "cifar10-jpeg" / "train.tar")
    labels = ds.labels
    per_val = valsplit.VAL_N // ds.num_classes
    g = torch.Generator().manual_seed(SEED)
    picks = {"A": [], "B": []}
    members = []
    for c in range(ds.num_classes):
        idx = torch.nonzero(labels == c).flatten()[per_val:]  # the class's images after the validation ones
        members.append(idx[torch.randperm(len(idx), generator=g)])
    order = torch.randperm(ds.num_classes, generator=g).tolist()
    for which, start in (("A", 0), ("B", REAL_N)):
        pos = [int(members[order[j % ds.num_classes]][j // ds.num_classes])
               for j in range(start, start + REAL_N)]  # round robin over classes, in a seeded class order
        picks[which] = pos
    for which, pos in picks.items():
        d = root / f"train-nonval-{REAL_N}-s{SEED}-{which}"
        px, ys = ds.uint8(torch.tensor(pos))
        for k, (p, y) in enumerate(zip(px, ys.tolist())):
            f = d / ds.classes[y] / (Path(ds.names[pos[k]]).stem + ".png")
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(p.permute(1, 2, 0).numpy()).save(f)
        (d / "DONE").write_text(json.dumps({"positions_in_train_tar": pos}))


def real_images(model, which: str = "A") -> tuple[torch.Tensor, torch.Tensor]:
    from zsq.data.eval import load_images
    from zsq.record import model_info

    return load_images(real_dir(which), model_info(model).preprocess, REAL_N, seed=SEED)


def synthetic_set(model, iters: int, batches=None):
    """Genie-D's seed-0 set at ``iters`` iterations per batch, through the path ``zsq quantize`` takes
    (``zsq.api.synthetic_data``: the resolved recipe's settings, ``zsq.synth.synthesize``, the same cache key);
    ``batches``: only these batches (an incomplete set of their images, as ``zsq synthesize --batches``)."""
    from zsq.api import resolve, synth_settings
    from zsq.synth import synthesize

    res = resolve("genie", protocol="genie-native")
    overrides, n = synth_settings(res, None if iters == DEFAULT_ITERS else {"iters": int(iters)})
    return synthesize(model, res.synth, budget=res.budget, seed=SEED, n_images=n, progress=False,
                      overrides=overrides or None, batches=list(batches) if batches is not None else None)


# ----------------------------------------------------------------------------------------------------------
# measurements

def block_names(model) -> list[str]:
    """The residual blocks' module names in depth order (their outputs are the feature layers; the last one's
    pooled output is the classifier's input)."""
    return [n for n, m in model.named_modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]


def features(model, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Global-average-pooled FP features (N, C) at every :func:`block_names` output, and the logits."""
    mods = dict(model.named_modules())
    feats: dict[str, list] = {n: [] for n in block_names(model)}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: feats[n].append(
        o.float().mean((2, 3)))) for n in feats]
    try:
        with torch.inference_mode():
            logits = torch.cat([model(x[i:i + BN_BATCH]).float() for i in range(0, len(x), BN_BATCH)])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in feats.items()}, logits


def bn_match(model, x: torch.Tensor) -> dict:
    """Genie's BNS term per BN layer on ``x`` in batches of :data:`BN_BATCH`, split into the mean and std parts
    (``BNStatsLoss.preset("genie")`` with one part's weight at 0), averaged over the batches."""
    from zsq.synth.losses import BNStatsLoss

    parts = {"mean": dict(mean_weight=1.0, disp_weight=0.0), "std": dict(mean_weight=0.0, disp_weight=1.0)}
    acc = {k: [] for k in parts}
    names = None
    for k, w in parts.items():
        with BNStatsLoss.preset("genie", model, **w) as bns, torch.inference_mode():
            names = bns.names
            for i in range(0, len(x), BN_BATCH):
                model(x[i:i + BN_BATCH])
                acc[k].append(bns.layer_losses().double())
    mean = torch.stack(acc["mean"]).mean(0)
    std = torch.stack(acc["std"]).mean(0)
    return {"names": names, "mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std],
            "total": [round(float(v), 6) for v in mean + std], "sum": round(float((mean + std).sum()), 5)}


def diagnose(name: str, model_id: str, iters: int | None, batches=None) -> dict:
    from zsq.models.zoo import load_model

    t0 = time.perf_counter()
    model = load_model(model_id).eval()
    xa, ya = real_images(model, "A")
    ref_feats, ref_logits = features(model, xa)
    bw = {n: median_bandwidth(f) for n, f in ref_feats.items()}
    rec: dict = {"name": name, "kind": "diag", "model": model_id, "seed": SEED}
    labels = None
    if iters is None:  # the real reference itself, and a disjoint real set against it (the floor)
        x, y = real_images(model, "B")
        rec.update(set="real", iters=None, set_dir=str(real_dir("B")), n_images=len(x), synth_wall_s=0.0)
        rec["ref_bn"] = bn_match(model, xa)
        rec["ref_fp_top1"] = round(100 * float((ref_logits.argmax(1) == ya).float().mean()), 2)
        labels = y
    else:
        sset = synthetic_set(model, iters, batches)
        x, labels, shards = sset.images.float(), sset.labels, list(sset.shards)
        if batches is not None and sset.complete:  # a finished set holds every batch: keep the asked ones
            at, keep = 0, []
            for sh in shards:
                if sh["index"] in batches:
                    keep.extend(range(at, at + int(sh["n"])))
                at += int(sh["n"])
            shards = [sh for sh in shards if sh["index"] in batches]
            x = x[keep]
            labels = None if labels is None else labels[keep]
        rec.update(set=SETS.get(iters, f"i{iters}") + ("" if batches is None else "b" + "".join(map(str, batches))),
                   iters=iters, batches=None if batches is None else list(batches), set_key=Path(sset.dir).name,
                   n_images=len(x), synth_wall_s=round(sum(float(s.get("wall_s", 0.0)) for s in shards), 1),
                   synth_loss_last=[s.get("loss_last") for s in shards])
    feats, logits = features(model, x)
    rec["bn"] = bn_match(model, x)
    rec["layers"] = list(feats)
    rec["mmd2"] = [round(mmd2_rbf(feats[n], ref_feats[n], bw[n]), 6) for n in feats]
    prob = logits.softmax(1)
    pred = prob.argmax(1)
    nc = prob.shape[1]
    rec.update(confidence=round(float(prob.max(1).values.mean()), 4),
               class_entropy=round(class_entropy(pred, nc), 4), class_counts=torch.bincount(pred, minlength=nc).tolist(),
               fp_top1_intended=None if labels is None else round(100 * float((pred == labels).float().mean()), 2))
    ref_prob = ref_logits.softmax(1)
    rec.update(ref_confidence=round(float(ref_prob.max(1).values.mean()), 4),
               ref_class_entropy=round(class_entropy(ref_prob.argmax(1), nc), 4),
               ref_dir=str(real_dir("A")), diag_wall_s=round(time.perf_counter() - t0, 1), **valsplit.env_fields())
    return rec


def quant(name: str, model_id: str, iters: int | None, bits=(3, 3)) -> dict:
    from zsq.api import quantize
    from zsq.models.zoo import load_model

    model = load_model(model_id)
    t0 = time.perf_counter()
    synth_s, kw, key = 0.0, {}, None
    if iters is None:
        kw = {"calib": str(real_dir("A")), "calib_n": REAL_N}
    else:
        sset = synthetic_set(model, iters)
        synth_s = float(json.loads((Path(sset.dir) / "meta.json").read_text()).get("wall_s", 0.0))
        key = Path(sset.dir).name
        if iters != DEFAULT_ITERS:
            kw = {"synth_overrides": {"iters": int(iters)}}
    t1 = time.perf_counter()
    q = quantize(model, "genie", bits[0], bits[1], protocol="genie-native", seed=SEED, progress=False, **kw)
    recon_s = time.perf_counter() - t1
    fid = valsplit.fidelity(model, q, valsplit.val_dataset(model))
    return {"name": name, "kind": "quant", "model": model_id, "set": "real" if iters is None else SETS.get(iters),
            "iters": iters, "set_key": key, "bits": f"W{bits[0]}A{bits[1]}", "seed": SEED, "recipe": "genie",
            "protocol": "genie-native", "synth_wall_s": round(synth_s, 1), "recon_wall_s": round(recon_s, 1),
            "process_wall_s": round(time.perf_counter() - t0, 1), **fid, **valsplit.env_fields()}


def run(name: str) -> dict:
    kind, model_id, iters, batches = EXPERIMENTS[name]
    return diagnose(name, model_id, iters, batches) if kind == "diag" else quant(name, model_id, iters)


# ----------------------------------------------------------------------------------------------------------
# outputs

def load() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]


def plot(recs: list[dict], out: Path = PLOT) -> Path | None:
    """Top: Genie's BNS term per BN layer and the MMD^2 per block output against relative depth (each model's
    default-budget set; the real sets dashed / dotted); bottom: the BNS sum over layers and the mean MMD^2 over
    the blocks against synthesis iterations per batch (the real set B as a dashed line)."""
    diags = [r for r in recs if r.get("kind") == "diag"]
    if not diags:
        return None
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    axes = axes.flatten()
    for ci, m in enumerate(MODELS):
        short = m.replace("cifar10_", "")
        mine = [r for r in diags if r["model"] == m]
        default = "i300" if any(r["set"] == "i300" for r in mine) else "i300b0"
        for r in mine:
            if r["set"] not in (default, "real"):
                continue
            if r["set"] == "real":
                ls, lab = "--", f"{short} real B"
            else:
                ls, lab = "-", f"{short} synthetic, 300 it ({r['n_images']} images)"
            bn = r["bn"]["total"]
            axes[0].plot([i / (len(bn) - 1) for i in range(len(bn))], bn, ls, marker="o", ms=3, color=f"C{ci}",
                         label=lab)
            if r["set"] == "real":
                ref = r["ref_bn"]["total"]
                axes[0].plot([i / (len(ref) - 1) for i in range(len(ref))], ref, ":", color=f"C{ci}",
                             label=f"{short} real A (reference)")
            mm = r["mmd2"]
            axes[1].plot([(i + 1) / len(mm) for i in range(len(mm))], mm, ls, marker="o", ms=3, color=f"C{ci}",
                         label=lab)
        for part, mk in ((False, "o-"), (True, "s:")):  # whole sets, and batch-0-only sets
            pts = sorted((r["iters"], r["bn"]["sum"], sum(r["mmd2"]) / len(r["mmd2"]))
                         for r in mine if r["iters"] and bool(r.get("batches")) == part)
            if pts:
                lab = f"{short} synthetic" + (" (batch 0, 128 images)" if part else " (256 images)")
                axes[2].plot([p[0] for p in pts], [p[1] for p in pts], mk, color=f"C{ci}", label=lab)
                axes[3].plot([p[0] for p in pts], [p[2] for p in pts], mk, color=f"C{ci}", label=lab)
        for r in mine:
            if r["set"] == "real":
                axes[2].axhline(r["bn"]["sum"], color=f"C{ci}", ls="--", lw=1, label=f"{short} real B")
                axes[3].axhline(sum(r["mmd2"]) / len(r["mmd2"]), color=f"C{ci}", ls="--", lw=1,
                                label=f"{short} real B (floor)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("relative depth of the BN layer (0 = stem, 1 = last)")
    axes[0].set_ylabel("Genie BNS term of the layer (log)")
    axes[0].set_title("BN-statistics match per layer")
    axes[1].set_xlabel("relative depth of the block output (1 = the last block)")
    axes[1].set_ylabel("MMD² to real reference A")
    axes[1].set_title("FP feature distance per block")
    for ax in axes[2:]:
        ax.set_xscale("log")
        ax.set_xticks(sorted(SETS), [str(k) for k in sorted(SETS)])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(80, 750)
        ax.set_xlabel("synthesis iterations per batch (300 = default)")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("sum of the BNS terms over layers (log)")
    axes[2].set_title("BN match against synthesis budget")
    axes[3].set_ylabel("mean MMD² over the blocks")
    axes[3].set_title("feature distance against synthesis budget")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Genie-D (seed 0) vs real training images (not the validation split): ResNet-20 / ResNet-32")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def table() -> str:
    sys.path.insert(0, str(HERE))
    from results.synthetic_gap import synthetic_gap_section

    return "\n".join(synthetic_gap_section(OUT))


def summary(d: dict) -> str:
    if d["kind"] == "quant":
        return valsplit.synth_recon_summary(d)
    return (f"BNS sum {d['bn']['sum']:.3f}, max block MMD2 {max(d['mmd2']):.4f}, confidence {d['confidence']:.3f}, "
            f"class entropy {d['class_entropy']:.3f}")


def main(argv: list[str]) -> int:
    if "--plot" in argv:
        print(plot(load()))
        return 0
    rc = valsplit.main(argv, EXPERIMENTS, run, OUT, table, summary)
    if rc == 0 and "--list" not in argv and "--table" not in argv:
        plot(load())
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
