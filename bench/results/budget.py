"""Accuracy against budget (issues 5 / 8 / 10): the points of ``zsq bench run budget``'s curves (also drawn by
``bench/budget_plot.py``) and their section."""

from __future__ import annotations

from pathlib import Path

from zsq.bench.runner import run_wall_s
from zsq.bench.suites import BUDGET_CURVES

from .common import shown_path
from .targets import family_goal


#: the bit widths of the budget curves' points (those with targets)
BUDGET_BITS = ("W4A4", "W3A3")


#: issues 5 / 8 / 10: each curve's targets per bit width (``bench/budget_plot.py`` draws the W3A3 one)
BUDGET_TARGETS = {recipe: {bits: family_goal(recipe, bits, proto) for bits in BUDGET_BITS}
                  for recipe, proto, *_ in BUDGET_CURVES}


def budget_points(recs: list[dict]) -> list[dict]:
    """The points of the accuracy-against-budget curves (``BUDGET_CURVES``): per recipe, its ResNet-20 W4A4 / W3A3
    runs under the curve's protocol (default budget, synthetic data, seed 0) whose only extra flag sets the curve's hparam,
    and the plain default run; each with the hparam's value, the multiple of the default, loop iterations
    (``qat``: epochs x steps per epoch; ``genie``: steps per block), top-1, the target and wall minutes.
    Sorted by recipe, bits, value."""
    pts = []
    for recipe, proto, key, default, _ in BUDGET_CURVES:
        for r in recs:
            run, z = r["run"], r["zsq"]
            extra = list(run.get("extra") or ())
            top1 = (z.get("metrics") or {}).get("top1")
            if (run["recipe"] != recipe or run["protocol"] != proto or run.get("calib") or run["seed"] != 0
                    or run["model"] != "cifar10_resnet20" or f"W{run['w']}A{run['a']}" not in BUDGET_BITS
                    or run.get("budget") != "default" or top1 is None
                    or not (extra == [] or (len(extra) == 2 and extra[0] == "--set"
                                            and extra[1].startswith(f"{key}=")))):
                continue
            hp = (z.get("recipe") or {}).get("hparams") or {}
            value = hp.get(key, default)
            bits = f"W{run['w']}A{run['a']}"
            loops = hp.get("epochs", 0) * hp.get("steps_per_epoch", 0) if proto == "qat" else value
            pts.append({"recipe": recipe, "protocol": proto, "bits": bits, "key": key, "value": value,
                        "scale": value / default, "iters": loops, "top1": top1,
                        "goal": family_goal(recipe, bits, proto), "wall_min": run_wall_s(r) / 60})
    return sorted(pts, key=lambda p: (p["recipe"], p["bits"], p["value"]))


def budget_section(recs: list[dict], runs_dir: Path) -> list[str]:
    """Issues 5 / 8 / 10: accuracy against budget, once some curve has a point besides its default run."""
    pts = budget_points(recs)
    if not any(p["scale"] != 1 for p in pts):
        return []
    png = runs_dir / "budget" / "accuracy_vs_budget.png"
    out = ["## Accuracy against budget (`zsq bench run budget`)", "",
           "ResNet-20, seed 0, top-1 on the test set; one run per point (each point is its own run with its own "
           "schedule, not an intermediate epoch of a longer one). Under `qat`: `qat-zeroq`, the QAT baseline "
           "(5,120 `zeroq` images, the shared KD loop), budget = steps per epoch of its 4 epochs; `gdfq`: the "
           "generator lineage's base, `adasg`: the best generator recipe at W3A3, budget = epochs of 100 "
           "iterations (the first a warm-up). Under `genie-native`: `genie`, budget = reconstruction steps per "
           "block (batch 8; loop iterations = steps per block, 11 blocks) on the default run's synthetic set "
           "(256 images; the paper: 20,000 steps of batch 32 on 1,024). Target: the family's (`qat`) or the "
           "recipe's own (3-seed means; these points are seed 0). Wall minutes include the synthesis only where "
           "the run made its synthetic set."
           + (f" Plot: `{shown_path(png)}` (`python bench/budget_plot.py`)." if png.exists() else ""), "",
           "| recipe | protocol | bits | budget hparam | x default | loop iterations | top-1 | target | wall min |",
           "|---|---|---|---|---|---|---|---|---|"]
    for p in pts:
        out.append(f"| {p['recipe']} | {p['protocol']} | {p['bits']} | {p['key']}={p['value']} | {p['scale']:.2g} | "
                   f"{p['iters']} | {p['top1']:.2f} | {p['goal'] or '—'} | {p['wall_min']:.1f} |")
    return out + [""]
