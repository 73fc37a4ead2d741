"""``zsq report OUT``: a human-readable report of one quantized output, as markdown + HTML + PNGs.

Written to ``OUT/report/`` (built in a temporary directory, then moved into place):

* ``synthetic.png``: a grid of the first 64 calibration images (de-normalised), when the output
  was calibrated on a synthetic set that is still on disk;
* ``loss.png``: the synthesizer's loss against iteration for every batch (``loss_trace`` in the
  shard sidecars);
* ``sqnr.png``: per-layer weight SQNR (dB) of round-to-nearest on the layer's final grid against the
  saved (learnt: AdaRound / SQuant) weights, i.e. before / after reconstruction, and the SQNR of
  every activation output (and the logits) of the quantized model against the FP model on the
  calibration images;
* ``accuracy.png`` (with ``--bench DIR``): top-1 against bit setting for every recipe of the same
  model and protocol found in the benchmark folder;
* ``report.md`` and ``index.html`` linking them, with the output's provenance from ``zsq.json``.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .errors import DataError

BIT_ORDER = ["W8A8", "W6A6", "W5A5", "W4A8", "W4A4", "W3A3", "W2A4", "W2A2"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    """Every report figure is laid out, written at the same resolution, and closed the same way."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    noise = float((ref - x).double().pow(2).sum())
    sig = float(ref.double().pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * math.log10(max(sig, 1e-30) / noise)


def _images_png(images: torch.Tensor, pre, path: Path) -> None:
    from torchvision.utils import save_image

    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    x = (images[:64].float() * std + mean).clamp(0, 1)
    if x.shape[-1] < 64:  # CIFAR-sized: enlarge so that the grid is legible
        x = torch.nn.functional.interpolate(x, scale_factor=3, mode="nearest")
    save_image(x, str(path), nrow=8, padding=2, pad_value=1.0)


def _loss_png(sides: list[dict], path: Path) -> bool:
    traces = [(s.get("index"), s.get("loss_trace") or []) for s in sides]
    traces = [(k, t) for k, t in traces if t]
    if not traces:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, t in traces:
        ax.plot([p[0] for p in t], [p[1] for p in t], label=f"batch {k}", lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("synthesis loss (log)")
    ax.set_title("synthesis loss per batch")
    if len(traces) <= 10:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
    return True


_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish)


@torch.no_grad()
def layer_sqnr(qmodel: nn.Module, fp: nn.Module | None, images: torch.Tensor | None
               ) -> tuple[list[dict], list[dict]]:
    """Per quantized layer: weight SQNR of round-to-nearest and of the saved weights on the same
    grid. With ``fp`` and ``images``, also per activation module present in both models (BN folding
    changes what a conv outputs, an activation's output means the same in both): the SQNR of its
    output in ``qmodel`` (quantized, as the next layer reads it) against the FP model's."""
    from .quant.modules import QUANT_LAYERS

    rows = []
    for name, m in qmodel.named_modules():
        if not isinstance(m, QUANT_LAYERS):
            continue
        w = m.weight.detach()
        q = m.wq
        s, z = q._shape(w, q.scale.detach()), q._shape(w, q.zero_point)
        nearest = (torch.clamp(torch.round(w / s) + z, q.qmin, q.qmax) - z) * s
        rows.append({"layer": name, "bits": q.bits, "w_sqnr_nearest": _sqnr(w, nearest),
                     "w_sqnr_saved": _sqnr(w, m.qweight().detach())})
    acts: list[dict] = []
    if fp is None or images is None:
        return rows, acts
    fp_mods = dict(fp.named_modules())
    names = [n for n, m in qmodel.named_modules() if isinstance(m, _ACTS) and isinstance(fp_mods.get(n), _ACTS)]
    outs: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    hooks = []
    for n in names:
        hooks.append(qmodel.get_submodule(n).register_forward_hook(
            lambda mod, i, o, n=n: outs[n].__setitem__("q", o.detach().clone())))
        hooks.append(fp_mods[n].register_forward_hook(lambda mod, i, o, n=n: outs[n].__setitem__("fp", o.detach().clone())))
    was_q, was_fp = qmodel.training, fp.training
    try:
        qmodel.eval(), fp.eval()
        x = images[:64].float()
        out_q, out_fp = qmodel(x), fp(x)
    finally:
        for h in hooks:
            h.remove()
        qmodel.train(was_q), fp.train(was_fp)
    for n in names:
        o = outs.get(n, {})
        if "q" in o and "fp" in o and o["q"].shape == o["fp"].shape:
            acts.append({"module": n, "sqnr": _sqnr(o["fp"], o["q"])})
    acts.append({"module": "logits", "sqnr": _sqnr(out_fp, out_q)})
    return rows, acts


def _sqnr_png(rows: list[dict], acts: list[dict], path: Path) -> None:
    plt = _plt()
    n_plots = 2 if acts else 1
    fig, axes = plt.subplots(n_plots, 1, figsize=(max(7, 0.42 * len(rows) + 2), 4.2 * n_plots), squeeze=False)
    ax = axes[0][0]
    idx = list(range(len(rows)))
    wdt = 0.38
    ax.bar([i - wdt / 2 for i in idx], [r["w_sqnr_nearest"] for r in rows], wdt, label="round-to-nearest")
    ax.bar([i + wdt / 2 for i in idx], [r["w_sqnr_saved"] for r in rows], wdt, label="saved (learnt) weights")
    ax.set_xticks(idx)
    ax.set_xticklabels([f"{r['layer']} ({r['bits']}b)" for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("weight SQNR (dB)")
    ax.set_title("per-layer weight quantization SQNR")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if acts:
        ax = axes[1][0]
        ax.plot(range(len(acts)), [a["sqnr"] for a in acts], marker="o")
        ax.set_xticks(range(len(acts)))
        ax.set_xticklabels([a["module"] for a in acts], rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("SQNR vs FP (dB)")
        ax.set_title("activation outputs of the quantized model against the FP model (calibration images)")
        ax.grid(alpha=0.3)
    _save(plt, fig, path)


def _accuracy_png(bench: Path, model_id: str, protocol: str, path: Path) -> bool:
    series: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in sorted(bench.glob("*.json")):
        try:
            r = json.loads(p.read_text())
            run, z = r["run"], r["zsq"]
        except (KeyError, ValueError):
            continue
        if run.get("model") != model_id or run.get("protocol") != protocol or not (z.get("metrics") or {}).get("top1"):
            continue
        label = (f"calib-real ({run['recipe']})" if run.get("calib") else run["recipe"]) + \
            (" " + " ".join(run["extra"]) if run.get("extra") else "") + f" [{run.get('budget')}]"
        series[label][f"W{run['w']}A{run['a']}"].append(z["metrics"]["top1"])
    if not series:
        return False
    cols = [b for b in BIT_ORDER if any(b in s for s in series.values())]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, pts in sorted(series.items()):
        xs = [i for i, b in enumerate(cols) if b in pts]
        ax.plot(xs, [sum(pts[cols[i]]) / len(pts[cols[i]]) for i in xs], marker="o", label=label)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{model_id}, protocol {protocol}: top-1 against bits (mean over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
    return True


def write_report(out: str | os.PathLike, bench: str | os.PathLike | None = None) -> Path:
    """Build ``OUT/report/`` (see module doc) and return its ``report.md`` path."""
    from . import api
    from .data.shards import SyntheticSet, sidecar_path

    out = Path(out)
    q = api.load(out)
    meta = json.loads((out / "zsq.json").read_text())
    dest = out / "report"
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    figs: list[tuple[str, str]] = []
    images = None
    try:
        syn = meta.get("synthetic") or {}
        if syn.get("kind") == "synthetic" and syn.get("dir") and Path(syn["dir"]).is_dir():
            s = SyntheticSet.load(syn["dir"])
            images = s.images
            _images_png(images, q.zsq_info.preprocess, tmp / "synthetic.png")
            figs.append(("synthetic.png", f"First {min(64, len(images))} of {len(images)} synthetic calibration images "
                                          f"({meta['recipe'].get('synth')}, de-normalised)"))
            sides = [json.loads(sidecar_path(s.dir / sh["file"]).read_text()) for sh in s.shards]
            if _loss_png(sides, tmp / "loss.png"):
                figs.append(("loss.png", "Synthesis loss against iteration, per batch"))
        fp = None
        try:
            fp = api.load_model(meta["model"]["id"])
        except Exception:  # noqa: BLE001 - a user model without its factory: weight SQNR only
            fp = None
        rows, acts = layer_sqnr(q, fp, images)
        _sqnr_png(rows, acts, tmp / "sqnr.png")
        figs.append(("sqnr.png", "Per-layer weight SQNR (round-to-nearest vs the saved weights on the same grid)"
                                 + ("; SQNR of every activation output against the FP model on the calibration "
                                    "images" if acts else "")))
        if bench is not None:
            if not Path(bench).is_dir():
                raise DataError(f"--bench {bench} is not a directory")
            if _accuracy_png(Path(bench), meta["model"]["id"], meta["protocol"], tmp / "accuracy.png"):
                figs.append(("accuracy.png", f"Top-1 against bit setting, {meta['model']['id']}, protocol "
                                             f"{meta['protocol']}, from {bench}"))
        m = meta.get("metrics") or {}
        facts = [("model", meta["model"]["id"]), ("recipe", meta["recipe"]["name"]),
                 ("synthesizer / quantizer", f"{meta['recipe'].get('synth')} / {meta['recipe'].get('quant')}"),
                 ("protocol", meta["protocol"]), ("bits", f"W{meta['bits']['w']}A{meta['bits']['a']}"),
                 ("budget, seed", f"{meta['budget']}, {meta['seed']}"),
                 ("top-1 / top-5", f"{m.get('top1', '—')} / {m.get('top5', '—')} on {meta.get('n_eval') or '—'} images"),
                 ("wall s", meta.get("wall_s")),
                 ("size", f"{meta['size']['fp_bytes']:,} -> {meta['size']['q_bytes']:,} bytes")]
        md = [f"# zsq report: {out.name}", "", "| | |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in facts]
        md += ["", "| layer | bits | weight SQNR nearest (dB) | weight SQNR saved (dB) |", "|---|---|---|---|"]
        md += [f"| {r['layer']} | {r['bits']} | {r['w_sqnr_nearest']:.2f} | {r['w_sqnr_saved']:.2f} |" for r in rows]
        if acts:
            md += ["", "| activation | SQNR vs FP (dB) |", "|---|---|"]
            md += [f"| {a['module']} | {a['sqnr']:.2f} |" for a in acts]
        for f, cap in figs:
            md += ["", f"![{cap}]({f})", "", f"*{cap}*"]
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        body = ["<table>"] + [f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts]
        body += ["</table>"] + [f"<figure><img src='{f}' alt='{html.escape(c)}'><figcaption>{html.escape(c)}"
                                f"</figcaption></figure>" for f, c in figs]
        (tmp / "index.html").write_text("<!doctype html><meta charset='utf-8'><title>zsq report</title>"
                                        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
                                        "img{max-width:100%}th{text-align:left;padding-right:1em}</style>"
                                        f"<h1>zsq report: {html.escape(out.name)}</h1>" + "".join(body) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / "report.md"
