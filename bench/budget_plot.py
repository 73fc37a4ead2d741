"""Accuracy against budget (issues 5 / 8 / 10): draw the points of ``zsq bench run budget`` as a PNG.

Reads ``bench/runs/*.json`` (the curves' runs and the plain default runs they share with the ``qat`` /
``gen`` / ``genie`` suites, selected by ``results.budget.budget_points``) and writes
``bench/runs/budget/accuracy_vs_budget.png``: top-1 against the multiple of the default budget (left)
and against wall minutes (right), one line per (recipe, bits), with each family's W3A3 target dashed.
``zsq bench report`` then links the PNG from docs/results.md.

    python bench/budget_plot.py [--runs-dir bench/runs] [--out bench/runs/budget/accuracy_vs_budget.png]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from results.budget import BUDGET_TARGETS, budget_points
from results.common import load_runs


def plot(points: list[dict], targets: dict[str, dict[str, float]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for p in points:
        lines[(p["recipe"], p["bits"])].append(p)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    goals = defaultdict(list)  # one dashed line per W3A3 target value, naming the recipes it is the target of
    for i, ((recipe, bits), pts) in enumerate(sorted(lines.items())):
        for ax, x in zip(axes, ("scale", "wall_min")):
            pts_x = sorted(pts, key=lambda p: p[x])
            ax.plot([p[x] for p in pts_x], [p["top1"] for p in pts_x], "o-", color=f"C{i}", label=f"{recipe} {bits}")
        goal = targets.get(recipe, {}).get(bits) if bits == "W3A3" else None
        if goal is not None:
            goals[goal].append(recipe)
    for goal, recipes in sorted(goals.items()):
        for ax in axes:
            ax.axhline(goal, color="gray", ls="--", lw=1, label=f"W3A3 target {goal:g} ({', '.join(recipes)})")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("budget (x the default: student steps, or reconstruction steps for genie)")
    axes[1].set_xlabel("wall minutes per run (see results.md for threads)")
    axes[0].set_ylabel("top-1 on the CIFAR-10 test set (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle("ResNet-20, seed 0: accuracy against budget (one run per point; genie under genie-native, the rest qat)")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default="bench/runs")
    ap.add_argument("--out", default=None, help="PNG path (default: RUNS_DIR/budget/accuracy_vs_budget.png)")
    args = ap.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    points = budget_points(load_runs(runs_dir))
    if not points:
        print(f"error: no runs of the budget curves in {runs_dir} (run `zsq bench run budget`)", file=sys.stderr)
        return 2
    out = plot(points, BUDGET_TARGETS, Path(args.out) if args.out else runs_dir / "budget" / "accuracy_vs_budget.png")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
