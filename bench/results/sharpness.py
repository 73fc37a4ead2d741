"""``bench/sharpness.py`` (issue 6, part 3): sharpness of the quantized model per calibration source."""

from __future__ import annotations

from pathlib import Path

from .common import load_runs


def sharpness_rows(recs: list[dict]) -> list[str]:
    """The table of ``bench/sharpness.py`` records: per source, the loss L0 and top-1 on the fixed real set and
    the mean +- std (over the random directions) loss increase at each radius rho, activations quantized."""
    rhos = sorted({x for r in recs for x in r["sharpness"]["rho"]})
    rows = ["| source | bits | budget | seed | L0 | top-1 | " + " | ".join(f"dL rho={x:g}" for x in rhos) + " |",
            "|---" * (6 + len(rhos)) + "|"]
    for r in recs:
        s = r["sharpness"]
        by = dict(zip(s["rho"], zip(s["mean"], s["std"])))
        rows.append(f"| {r['source']} | {r['bits']} | {r['budget']} | {r['seed']} | {s['loss0']:.4f} | "
                    f"{s['top1']:.1f} | " + " | ".join(f"{by[x][0]:.4f} ± {by[x][1]:.4f}" if x in by else "—" for x in rhos) + " |")
    return rows


def sharpness_section(d: Path) -> list[str]:
    """``bench/sharpness.py`` (issue 6, part 3): sharpness of ``genie``-quantized ResNet-20 per calibration source."""
    recs = [r for r in load_runs(d) if r.get("budget") != "smoke"]
    if not recs:
        return []
    r0 = recs[0]
    return (["## Sharpness of the quantized model per calibration source (`bench/sharpness.py`)", "",
             f"{r0.get('model')}, the `genie` recipe's quantizer (Genie-M, `{r0.get('protocol')}`) on each source's "
             f"synthetic set ({r0['synthetic'].get('n_images')} images each); on the first "
             f"{r0['sharpness']['n']} images of "
             "`cifar10-jpeg/train.tar` (100 per class): cross-entropy L0, top-1, and the loss increase under random "
             "relative perturbations of the dequantized weights (per output channel, ||d_c|| ~ rho ||w_c||; "
             f"K = {r0['sharpness']['k']} directions, the same for every source). Lower = flatter. Plots: "
             "`bench/runs/sharpness/sharpness_<bits>.png` (also with activation quantizers off), synthetic "
             "images: `bench/runs/sharpness/images_<source>.png`.", ""]
            + sharpness_rows(recs) + [""])
