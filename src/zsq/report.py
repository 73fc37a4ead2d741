"""``zsq report OUT``: a human-readable report of one quantized output, as markdown + HTML + PNGs.

Written to ``OUT/report/`` (built in a temporary directory, then moved into place):

* ``synthetic.png``: a grid of the first 64 calibration images (de-normalised), when the output
  was calibrated on a synthetic set that is still on disk;
* ``loss.png``: the synthesizer's loss against iteration for every batch (``loss_trace`` in the
  shard sidecars);
* ``sqnr.png`` and ``layers.csv``: per quantized layer, the SQNR (dB) against the FP model's weights
  of round-to-nearest on the layer's final grid and of the saved (learnt: AdaRound / SQuant) weights,
  i.e. before / after rounding was learnt. The FP reference is the model the quantizer started from,
  built the way it was: the recipe's pre-step (DFQ equalization) applied, then the protocol's
  :func:`~zsq.quant.protocol.apply_protocol` (BN folded into the conv, same layer names). Also the SQNR
  of every activation output (and the logits) of the quantized model against that FP model on the
  calibration images;
* ``bits.png``: after a mixed-precision search (``--wbits-avg`` / ``--size`` / ``--bops``), every layer's weight
  bits as a bar chart, searched layers and pinned ones apart, with the searched mean (and, after ``--bops``,
  each counted layer's input-activation bits as a mark);
* ``accuracy.png`` (with ``--bench DIR``): top-1 against bit setting for every recipe of the same
  model and protocol found in the benchmark folder, this output marked by a star;
* ``pareto.png``: the accuracy-size frontier of a ``zsq pareto`` run (its ``pareto.json``: uniform and
  mixed points, top-1 against weight memory, drawn by :func:`plot_pareto`), when ``OUT`` holds a
  ``pareto.json`` or ``--pareto DIR`` names a pareto directory; a pareto directory without a ``zsq.json``
  gets a report of its frontier alone (the figure and a table of the points);
* ``report.md`` and ``index.html`` linking them, with the output's provenance from ``zsq.json``; a top-1
  measured on an ``--eval-limit`` subset says so (images used, of how many).
"""

from __future__ import annotations

import copy
import csv
import html
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .errors import DataError, ZsqError
from .paths import new_dir_mode, writing
from .record import record_of

BIT_ORDER = ["W8A8", "W6A6", "W5A5", "W4A8", "W4A4", "W3A3", "W2A4", "W2A2"]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: Path) -> None:
    """Every report figure is laid out, written at the same resolution, and closed the same way."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: line style and legend words of an accuracy-size series by mode (uniform W, mixed searches)
SIZE_STYLE = {"uniform": ("s-", "uniform --w"), "kl": ("o-", "mixed --wbits-avg, KL (ZeroQ)"),
              "hessian": ("^", "mixed --wbits-avg, Hessian (HAWQ-v2)")}


def plot_accuracy_size(series: dict, out: Path, *, ylabel: str, title: str) -> Path:
    """Top-1 against weight memory: ``series`` maps (legend prefix, mode) to points (q bytes, top-1, bits
    label); each series is one line (style by mode, :data:`SIZE_STYLE`), each point labelled with its
    (mean) weight bits. Used by ``zsq pareto`` and bench/mixed_precision.py."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for (prefix, mode), pts in sorted(series.items()):
        pts = sorted(pts)
        fmt_, label = SIZE_STYLE.get(mode, ("x", mode))
        ax.plot([p[0] / 1000 for p in pts], [p[1] for p in pts], fmt_, label=f"{prefix}{label}")
        for x, y, w in pts:
            ax.annotate(f"{w:g}", (x / 1000, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("weight memory of the quantized model (kB: packed weights, scales, FP biases)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(plt, fig, out)
    return out


#: format of a ``zsq pareto`` run's ``pareto.json`` (zsq.pareto writes it, :func:`read_pareto` reads it)
PARETO_FORMAT = "zsq-pareto-1"


def plot_pareto(doc: dict, png: Path) -> Path:
    """``pareto.png`` of a ``zsq pareto`` document: its uniform and mixed points on one plot
    (:func:`plot_accuracy_size`); ``zsq pareto`` and ``zsq report`` both draw it here."""
    s = doc["settings"]
    series = defaultdict(list)
    for p in doc["points"]:
        series[("", p.get("sensitivity", "uniform"))].append((p["q_bytes"], p["top1"], p["w"]))
    n = doc["points"][0]["n_eval"] if doc["points"] else 0
    return plot_accuracy_size(series, png, ylabel=f"top-1 on {n} images of {Path(str(s.get('eval_data'))).name} (%)",
                              title=f"{s.get('model')}, {s.get('recipe')}, protocol {s.get('protocol')}, A{s.get('a')}, "
                                    f"seed {s.get('seed')}\naccuracy against weight memory (labels: W or mean W)")


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    noise = float((ref - x).double().pow(2).sum())
    sig = float(ref.double().pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * math.log10(max(sig, 1e-30) / noise)


def images_png(images: torch.Tensor, pre, path: Path) -> None:
    """A grid PNG of the first 64 of ``images`` (normalised with ``pre``'s mean / std), de-normalised."""
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
    plt = pyplot()
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
    save_figure(plt, fig, path)
    return True


_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish)


def fp_reference(qmodel: nn.Module, meta: dict) -> tuple[nn.Module, nn.Module]:
    """The FP model a saved output was quantized from, rebuilt like :func:`zsq.api.load` does (same model
    id, preprocessing and class count) with the recipe's pre-step applied (``zsq.json`` ``recipe.pre``
    and its hparams), as ``(fp, ref)``: ``fp`` unfolded (for activation outputs), ``ref`` laid out by the
    output's protocol (BN folded, same layer names as ``qmodel``) holding the FP weights to compare
    the quantized ones with."""
    from . import api
    from .quant.protocol import apply_protocol
    from .recipes import PRE_STEPS
    from .spec import PROTOCOLS

    rec = record_of(qmodel)
    info = rec.model
    fp = api.load_model(meta["model"]["id"], preprocess=info.preprocess, num_classes=info.num_classes)
    recipe = meta.get("recipe") or {}
    if recipe.get("pre"):
        fp = PRE_STEPS[recipe["pre"]](copy.deepcopy(fp), dict(recipe.get("hparams") or {}))
    lay = rec.layout
    with warnings.catch_warnings():  # unsupported layers were reported when the output was made
        warnings.simplefilter("ignore")
        ref = apply_protocol(fp, PROTOCOLS[lay.protocol], lay.w_bits, lay.a_bits)
    return fp, ref


@torch.no_grad()
def layer_sqnr(qmodel: nn.Module, fp: nn.Module | None, images: torch.Tensor | None,
               ref: nn.Module | None = None) -> tuple[list[dict], list[dict]]:
    """Per quantized layer: the SQNR against the FP weights (the same-named layer of ``ref``, see
    :func:`fp_reference`; without ``ref`` the layer's own stored weights, which are already on the grid
    after SQuant or AdaRound) of round-to-nearest on the layer's final grid and of the saved weights.
    With ``fp`` and ``images``, also per activation module present in both models (BN folding
    changes what a conv outputs, an activation's output means the same in both): the SQNR of its
    output in ``qmodel`` (quantized, as the next layer reads it) against the FP model's."""
    from .quant.modules import QUANT_LAYERS

    ref_mods = dict(ref.named_modules()) if ref is not None else {}
    rows = []
    for name, m in qmodel.named_modules():
        if not isinstance(m, QUANT_LAYERS):
            continue
        w = m.weight.detach()
        r = getattr(ref_mods.get(name), "weight", None)
        if ref is not None and (r is None or r.shape != w.shape):
            raise DataError(f"the FP model has no layer {name} of shape {tuple(w.shape)}: it does not match the output")
        w_fp = w if r is None else r.detach()
        q = m.wq
        s, z = q._shape(w_fp, q.scale.detach()), q._shape(w_fp, q.zero_point)
        nearest = (torch.clamp(torch.round(w_fp / s) + z, q.qmin, q.qmax) - z) * s
        rows.append({"layer": name, "bits": q.bits, "w_sqnr_nearest": _sqnr(w_fp, nearest),
                     "w_sqnr_saved": _sqnr(w_fp, m.qweight().detach())})
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
    plt = pyplot()
    n_plots = 2 if acts else 1
    fig, axes = plt.subplots(n_plots, 1, figsize=(max(7, 0.42 * len(rows) + 2), 4.2 * n_plots), squeeze=False)
    ax = axes[0][0]
    idx = list(range(len(rows)))
    wdt = 0.38
    def finite(key):  # an exact layer (infinite SQNR) gets no bar instead of breaking the axis
        return [r[key] if math.isfinite(r[key]) else float("nan") for r in rows]

    ax.bar([i - wdt / 2 for i in idx], finite("w_sqnr_nearest"), wdt, label="round-to-nearest")
    ax.bar([i + wdt / 2 for i in idx], finite("w_sqnr_saved"), wdt, label="saved (learnt) weights")
    ax.set_xticks(idx)
    ax.set_xticklabels([f"{r['layer']} ({r['bits']}b)" for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("weight SQNR vs FP (dB)")
    ax.set_title("per-layer weight quantization SQNR against the FP weights")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if acts:
        ax = axes[1][0]
        ax.plot(range(len(acts)), [a["sqnr"] if math.isfinite(a["sqnr"]) else float("nan") for a in acts], marker="o")
        ax.set_xticks(range(len(acts)))
        ax.set_xticklabels([a["module"] for a in acts], rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("SQNR vs FP (dB)")
        ax.set_title("activation outputs of the quantized model against the FP model (calibration images)")
        ax.grid(alpha=0.3)
    save_figure(plt, fig, path)


def _bits_png(meta: dict, path: Path) -> bool:
    """Per-layer weight bits of a mixed-precision output (zsq.json ``mixed`` and ``layout.weights``)."""
    mixed, weights = meta.get("mixed"), (meta.get("layout") or {}).get("weights") or {}
    if not mixed or not weights:
        return False
    plt = pyplot()
    names = list(weights)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 2), 3.6))
    searched = set(mixed.get("bits") or {})
    ax.bar(range(len(names)), [weights[n] for n in names],
           color=["C0" if n in searched else "0.6" for n in names])
    line = ax.axhline(mixed["wbits_avg"], color="C3", ls="--", lw=1)
    from matplotlib.patches import Patch

    handles = [line, Patch(color="C0"), Patch(color="0.6")]
    labels = [f"searched mean {mixed['wbits_avg']:g} (budget {mixed['budget']['kind']} {mixed['budget']['value']:g})",
              f"searched ({mixed.get('sensitivity')} sensitivity)", "pinned by the protocol / --layer-bits"]
    abits = {n: a for n, a in (mixed.get("abits") or {}).items() if n in weights and a <= 16}  # --bops: input bits
    if abits:
        xs = [i for i, n in enumerate(names) if n in abits]
        handles.append(ax.plot(xs, [abits[names[i]] for i in xs], "k_", markersize=12, mew=2)[0])
        labels.append(f"input-activation bits ({mixed['bops']['g']:.4g} GBOPs)")
    ax.legend(handles, labels, fontsize=7, loc="upper right")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("weight bits" + (" / input bits (-)" if abits else ""))
    ax.set_yticks(sorted({2, 4, 6, 8} | set(weights.values()) | set(abits.values())))
    fig.tight_layout()
    save_figure(plt, fig, path)
    return True


def _bit_order(bits: set[str]) -> list[str]:
    return [b for b in BIT_ORDER if b in bits] + sorted(bits - set(BIT_ORDER))


def _accuracy_png(bench: Path, model_id: str, protocol: str, path: Path, this: dict | None = None) -> bool:
    """Top-1 against bits from the benchmark records; ``this`` (``{"bits": "W4A4", "top1": .., "label": ..}``,
    this output) is marked by a star. False (nothing drawn) when there is nothing to plot."""
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
    if not series and this is None:
        return False
    cols = _bit_order({b for s in series.values() for b in s} | ({this["bits"]} if this else set()))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, pts in sorted(series.items()):
        xs = [i for i, b in enumerate(cols) if b in pts]
        ax.plot(xs, [sum(pts[cols[i]]) / len(pts[cols[i]]) for i in xs], marker="o", label=label)
    if this is not None:
        x = cols.index(this["bits"])
        ax.plot([x], [this["top1"]], linestyle="none", marker="*", markersize=17, color="crimson",
                markeredgecolor="black", zorder=5, label=this["label"])
        ax.annotate(f"this run {this['top1']:.2f}", (x, this["top1"]), textcoords="offset points", xytext=(0, 12),
                    ha="center", fontsize=8, color="crimson")
        ax.margins(x=0.1, y=0.12)  # room for the star's label at the plot's edges
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{model_id}, protocol {protocol}: top-1 against bits (mean over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(plt, fig, path)
    return True


def _layers_csv(rows: list[dict], path: Path) -> None:
    """One row per quantized layer: name, weight bits, weight SQNR (dB) of round-to-nearest and of the
    saved weights against the FP weights."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "bits", "w_sqnr_nearest_db", "w_sqnr_saved_db"])
        for r in rows:
            w.writerow([r["layer"], r["bits"], f"{r['w_sqnr_nearest']:.4f}", f"{r['w_sqnr_saved']:.4f}"])


CIFAR_TEST_IMAGES = 10_000  # CIFAR-10 and CIFAR-100 test sets


def _eval_set_size(meta: dict) -> int | None:
    """Images in the whole evaluation set the output's top-1 came from: counted in ``eval_path`` when it
    is still readable, else 10,000 for the CIFAR zoo models, else unknown (None)."""
    from .data.eval import open_dataset

    p = meta.get("eval_path")
    if p and Path(p).exists():
        try:
            return len(open_dataset(p))
        except ZsqError:
            pass
    return CIFAR_TEST_IMAGES if str(meta["model"]["id"]).startswith("cifar") else None


def write_report(out: str | os.PathLike, bench: str | os.PathLike | None = None,
                 pareto: str | os.PathLike | None = None) -> Path:
    """Build ``OUT/report/`` (see module doc) and return its ``report.md`` path. A write the file system
    refuses is a one-line :class:`~zsq.errors.OutputError`, and leaves no ``OUT/report``. ``pareto``: a
    ``zsq pareto`` directory whose frontier the report draws (default: ``OUT`` itself when it holds a
    ``pareto.json``)."""
    with writing(Path(out) / "report"):
        return _write_report(out, bench, pareto)


def read_pareto(pdir: str | os.PathLike) -> dict:
    """``DIR/pareto.json`` of a ``zsq pareto`` run, checked (one-line :class:`~zsq.errors.DataError` otherwise)."""
    path = Path(pdir) / "pareto.json"
    if not path.is_file():
        raise DataError(f"{pdir} has no pareto.json (write one with `zsq pareto ... -o {pdir}`)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}") from None
    if not isinstance(doc, dict) or doc.get("format") != PARETO_FORMAT or not isinstance(doc.get("points"), list) \
            or not all(isinstance(p, dict) and {"id", "q_bytes", "top1", "w"} <= set(p) for p in doc["points"]):
        raise DataError(f"{path} is not a zsq pareto.json ({PARETO_FORMAT})")
    doc.setdefault("settings", {})
    return doc


def _pareto_figure(pdir: Path, path: Path) -> tuple[str, list[str]] | None:
    """``pareto.png`` from ``pdir/pareto.json`` (:func:`plot_pareto`, as ``zsq pareto`` draws it), its caption
    and a markdown table of the points; None when it has no point."""
    doc = read_pareto(pdir)
    pts = doc["points"]
    if not pts:
        return None
    plot_pareto(doc, path)
    s = doc["settings"]
    n_u = sum(p.get("mode") == "uniform" for p in pts)
    cap = (f"Accuracy against weight memory: the zsq pareto run in {pdir} ({s.get('model')}, {s.get('recipe')}, "
           f"protocol {s.get('protocol')}, A{s.get('a')}; {n_u} uniform and {len(pts) - n_u} mixed points, "
           f"top-1 on {pts[0].get('n_eval')} images)")
    table = ["| point | mode | weight bytes | top-1 | top-5 |", "|---|---|---|---|---|"]
    for p in sorted(pts, key=lambda p: p["q_bytes"]):
        top5 = f"{p['top5']:.2f}" if isinstance(p.get("top5"), (int, float)) else "—"
        table.append(f"| {p['id']} | {p.get('mode', '')} | {p['q_bytes']:,} | {p['top1']:.2f} | {top5} |")
    return cap, table


def _write_pareto_only(out: Path, dest: Path) -> Path:
    """The report of a pareto directory without a zsq.json: its frontier and the points."""
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    os.chmod(tmp, new_dir_mode())
    try:
        got = _pareto_figure(out, tmp / "pareto.png")
        if got is None:
            raise DataError(f"{out / 'pareto.json'} holds no finished point yet: nothing to report")
        cap, table = got
        md = [f"# zsq report: {out.name} (accuracy-size frontier)", "", f"![{cap}](pareto.png)", "", f"*{cap}*", ""]
        md += table
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        rows = "".join(f"<tr>{''.join(f'<td>{html.escape(c.strip())}</td>' for c in r.strip('|').split('|'))}</tr>"
                       for r in table[2:])
        (tmp / "index.html").write_text(
            "<!doctype html><meta charset='utf-8'><title>zsq report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
            "td{padding-right:1em}</style>"
            f"<h1>zsq report: {html.escape(out.name)}</h1>"
            f"<figure><img src='pareto.png' alt='{html.escape(cap)}'><figcaption>{html.escape(cap)}</figcaption>"
            "</figure><table><tr><th>point</th><th>mode</th><th>weight bytes</th><th>top-1</th><th>top-5</th></tr>"
            + rows + "</table>\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / "report.md"


def _write_report(out: str | os.PathLike, bench: str | os.PathLike | None,
                  pareto: str | os.PathLike | None = None) -> Path:
    from . import api
    from .data.shards import SyntheticSet, sidecar_path
    from .spec import PROTOCOLS

    out = Path(out)
    if pareto is not None and not Path(pareto).is_dir():
        raise DataError(f"--pareto {pareto} is not a directory")
    if not (out / "zsq.json").is_file() and (out / "pareto.json").is_file() and out.is_dir():
        return _write_pareto_only(out, out / "report")
    q = api.load(out)
    meta = json.loads((out / "zsq.json").read_text())
    dest = out / "report"
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    os.chmod(tmp, new_dir_mode())  # mkdtemp makes it 0700; OUT/report gets the umask's mode like OUT's files
    figs: list[tuple[str, str]] = []
    images = None
    try:
        syn = meta.get("synthetic") or {}
        if syn.get("kind") == "synthetic" and syn.get("dir") and Path(syn["dir"]).is_dir():
            s = SyntheticSet.load(syn["dir"])
            images = s.images
            images_png(images, record_of(q).model.preprocess, tmp / "synthetic.png")
            figs.append(("synthetic.png", f"First {min(64, len(images))} of {len(images)} synthetic calibration images "
                                          f"({meta['recipe'].get('synth')}, de-normalised)"))
            sides = [json.loads(sidecar_path(s.dir / sh["file"]).read_text()) for sh in s.shards]
            if _loss_png(sides, tmp / "loss.png"):
                figs.append(("loss.png", "Synthesis loss against iteration, per batch"))
        fp_note = "the FP model's weights" + (f" after the {meta['recipe']['pre']} pre-step"
                                                 if (meta.get("recipe") or {}).get("pre") else "") \
            + (", BN folded as the protocol does" if PROTOCOLS[record_of(q).layout.protocol].fold_bn else "")
        try:
            fp, ref = fp_reference(q, meta)
        except ZsqError:  # the FP model cannot be rebuilt: weights against themselves, no activations
            fp = ref = None
            fp_note = "the stored weights (the FP model could not be rebuilt; inf where they lie on the grid)"
        rows, acts = layer_sqnr(q, fp, images, ref=ref)
        _sqnr_png(rows, acts, tmp / "sqnr.png")
        _layers_csv(rows, tmp / "layers.csv")
        figs.append(("sqnr.png", f"Per-layer weight SQNR against {fp_note}: round-to-nearest on the layer's grid "
                                 "and the saved weights (layers.csv)"
                                 + ("; SQNR of every activation output against the FP model on the calibration "
                                    "images" if acts else "")))
        if _bits_png(meta, tmp / "bits.png"):
            figs.append(("bits.png", "Weight bits per layer chosen by the mixed-precision search (zsq.json: mixed)"))
        pareto_table: list[str] = []
        pdir = Path(pareto) if pareto is not None else out
        if pareto is not None or (out / "pareto.json").is_file():
            got = _pareto_figure(pdir, tmp / "pareto.png")
            if got is not None:
                figs.append(("pareto.png", got[0]))
                pareto_table = got[1]
        m = meta.get("metrics") or {}
        n_eval, n_full = meta.get("n_eval"), None
        subset = ""
        if m.get("top1") is not None and n_eval:
            n_full = _eval_set_size(meta)
            if n_full is not None and n_eval < n_full:
                subset = (f"on {n_eval:,} of the {n_full:,} images of "
                          f"{Path(meta['eval_path']).name if meta.get('eval_path') else 'the test set'} "
                          "(an --eval-limit subset; the full-set top-1 differs)")
        bits = f"W{meta['bits']['w']}A{meta['bits']['a']}"
        if bench is not None:
            if not Path(bench).is_dir():
                raise DataError(f"--bench {bench} is not a directory")
            run = None
            if m.get("top1") is not None:
                run = {"bits": bits, "top1": float(m["top1"]),
                       "label": f"this run: {meta['recipe']['name']} {bits} [{meta['budget']}]"
                                + (f", {n_eval:,} images" if subset else "")}
            if _accuracy_png(Path(bench), meta["model"]["id"], meta["protocol"], tmp / "accuracy.png", run):
                figs.append(("accuracy.png", f"Top-1 against bit setting, {meta['model']['id']}, protocol "
                                             f"{meta['protocol']}, from {bench}"
                                             + (f"; the star is this run ({bits}, top-1 {m['top1']}"
                                                + (f" on {n_eval:,} of {n_full:,} images" if subset else "") + ")"
                                                if run else "; this run has no top-1 to mark")))
        top = f"{m.get('top1', '—')} / {m.get('top5', '—')} " + (subset or f"on {f'{n_eval:,}' if n_eval else '—'} images")
        facts = [("model", meta["model"]["id"]), ("recipe", meta["recipe"]["name"]),
                 ("synthesizer / quantizer", f"{meta['recipe'].get('synth')} / {meta['recipe'].get('quant')}"),
                 ("protocol", meta["protocol"]), ("bits", bits),
                 ("budget, seed", f"{meta['budget']}, {meta['seed']}"),
                 ("top-1 / top-5", top),
                 ("wall s", meta.get("wall_s")),
                 ("size", f"{meta['size']['fp_bytes']:,} -> {meta['size']['q_bytes']:,} bytes")]
        md = [f"# zsq report: {out.name}", ""]
        if subset:
            md += [f"> **Top-1 {m['top1']} was measured {subset}.**", ""]
        md += ["| | |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in facts]
        md += ["", f"Weight SQNR against {fp_note} (also in layers.csv):", "",
               "| layer | bits | weight SQNR nearest (dB) | weight SQNR saved (dB) |", "|---|---|---|---|"]
        md += [f"| {r['layer']} | {r['bits']} | {r['w_sqnr_nearest']:.2f} | {r['w_sqnr_saved']:.2f} |" for r in rows]
        if acts:
            md += ["", "| activation | SQNR vs FP (dB) |", "|---|---|"]
            md += [f"| {a['module']} | {a['sqnr']:.2f} |" for a in acts]
        for f, cap in figs:
            md += ["", f"![{cap}]({f})", "", f"*{cap}*"]
        if pareto_table:
            md += ["", "Points of the accuracy-size frontier (pareto.json):", ""] + pareto_table
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        body = [f"<p><strong>Top-1 {html.escape(str(m['top1']))} was measured {html.escape(subset)}.</strong></p>"] \
            if subset else []
        body += ["<table>"] + [f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts]
        body += ["</table>", "<p><a href='layers.csv'>layers.csv</a>: per-layer weight SQNR</p>"]
        body += [f"<figure><img src='{f}' alt='{html.escape(c)}'><figcaption>{html.escape(c)}</figcaption></figure>"
                 for f, c in figs]
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
