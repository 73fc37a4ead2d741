"""The "Targets" table that opens docs/results.md: each target of benchmarks.md and the issues against the
runs on record (met / not met / open)."""

from __future__ import annotations

import statistics
from collections import defaultdict

from zsq.bench.runner import run_wall_s

from .common import fmt_seeds, target_runs, top1_by_seed
from .qat import GENERATOR_RECIPES, NOISE_OPT_RECIPES, qat_baseline_rows
from .sadag import sadag_target_rows
from .vit import vit_target_rows


#: benchmarks.md's memory target, "< 4 GB RSS", in the MiB that ``peak_rss_mb`` records (the issue's reading)
PEAK_RSS_MIB = 4000


# (label, model, recipe, protocol, bits, extra, statistic, goal, needed seeds) -- from benchmarks.md / the issues
TARGETS = [
    ("zeroq, ptq, W4A8, mean of 3 seeds >= 79.4", "cifar10_resnet20", "zeroq", "ptq", "W4A8", "top1", 79.4, 3),
    ("zeroq, ptq, W4A4, mean of 3 seeds >= 75.0", "cifar10_resnet20", "zeroq", "ptq", "W4A4", "top1", 75.0, 3),
    ("zeroq, ptq: synthesis + first setting < 60 s (max over seeds)", "cifar10_resnet20", "zeroq", "ptq", None,
     "first_wall_max", -60.0, 3),
    ("best synthesis-free, fixed, W8A8 >= FP - 0.1 = 80.93", "cifar10_resnet20", ("dfq", "squant", "udfc"), "fixed",
     "W8A8", "top1_best", 80.93, 1),
    ("best synthesis-free, fixed, W4A8 > AIMET 79.75", "cifar10_resnet20", ("dfq", "squant", "udfc"), "fixed", "W4A8",
     "top1_best", 79.75, 1),
    ("best synthesis-free, fixed, W4A4 > AIMET 73.54", "cifar10_resnet20", ("dfq", "squant", "udfc"), "fixed", "W4A4",
     "top1_best", 73.54, 1),
    ("best synthesis-free, fixed, W3A3 > AIMET 47.73", "cifar10_resnet20", ("dfq", "squant", "udfc"), "fixed", "W3A3",
     "top1_best", 47.73, 1),
    ("synthesis-free runs < 10 s each (max wall)", None, ("dfq", "squant", "udfc"), "fixed", None, "wall_max", -10.0, 1),
    ("genie, genie-native, W4A4 >= 80.2", "cifar10_resnet20", "genie", "genie-native", "W4A4", "top1", 80.2, 1),
    ("genie, genie-native, W3A3, mean of 3 seeds >= 78.3", "cifar10_resnet20", "genie", "genie-native", "W3A3", "top1",
     78.3, 3),
    ("genie: synthesis + first setting <= 800 s (max over seeds)", "cifar10_resnet20", "genie", "genie-native", None,
     "first_wall_max", -800.0, 1),
    ("best QAT noise-optimization recipe, qat, W4A4 >= 78.5", "cifar10_resnet20", NOISE_OPT_RECIPES, "qat", "W4A4", "top1_best",
     78.5, 3),
    ("best QAT noise-optimization recipe, qat, W3A3 >= 72.0", "cifar10_resnet20", NOISE_OPT_RECIPES, "qat", "W3A3", "top1_best",
     72.0, 3),
    ("best generator recipe, qat, W4A4 >= 78.0", "cifar10_resnet20", GENERATOR_RECIPES, "qat", "W4A4", "top1_best", 78.0, 3),
    ("best generator recipe, qat, W3A3 >= 70.0", "cifar10_resnet20", GENERATOR_RECIPES, "qat", "W3A3", "top1_best", 70.0, 3),
    (f"peak RSS < 4 GB ({PEAK_RSS_MIB:,} MiB), any CIFAR recipe, default budget (max over runs)", "cifar10_*", None,
     None, None, "rss_max", -float(PEAK_RSS_MIB), 1),
]


def targets_section(recs: list[dict]) -> list[str]:
    """Each target of benchmarks.md / the issues against the runs on record (met / not met / open)."""
    rows = []
    for label, model, recipe, proto, bits, stat, goal, seeds in TARGETS:
        sel = target_runs(recs, model, recipe if isinstance(recipe, tuple) or recipe is None else (recipe,),
                           proto, bits)
        # seeds: the distinct seeds with a full evaluation that recorded a top-1 (those the mean is over)
        by = {k: list(v.values()) for k, v in top1_by_seed(sel).items()}
        n_seeds = len({r["run"]["seed"] for r in sel})
        value, shown = None, "—"
        if stat == "top1" and by:
            vals = [t for v in by.values() for t in v]
            value, n_seeds = statistics.mean(vals), len(vals)
            shown = fmt_seeds(vals)
        elif stat == "top1_best" and by:
            # met by a fully seeded recipe; else the best mean so far, open while it lacks seeds
            mean = {k: statistics.mean(v) for k, v in by.items()}
            full = [k for k in by if len(by[k]) >= seeds]
            best_full = max(full, key=mean.get) if full else None
            best = best_full if best_full and mean[best_full] >= goal else max(by, key=mean.get)
            value, n_seeds = mean[best], len(by[best])
            shown = f"{best}: {fmt_seeds(by[best])}"
            if best_full and best_full != best:
                shown += f"; best with {seeds} seeds: {best_full} {fmt_seeds(by[best_full])}"
        elif stat == "rss_max":
            rss = [r for r in sel if r["zsq"].get("peak_rss_mb") is not None]
            if rss:
                worst = max(rss, key=lambda r: r["zsq"]["peak_rss_mb"])
                value = -worst["zsq"]["peak_rss_mb"]
                over = sum(r["zsq"]["peak_rss_mb"] > -goal for r in rss)
                w = worst["run"]
                shown = (f"{-value:,.1f} MiB ({w['model']} {w['recipe']} {w['protocol']} W{w['w']}A{w['a']} "
                         f"seed {w['seed']}); {over} of {len(rss)} runs over")
        elif stat == "wall_max" and sel:
            value = -max(run_wall_s(r) for r in sel)
            shown = f"{-value:.1f} s (n={len(sel)})"
        elif stat == "first_wall_max" and sel:
            per_seed = defaultdict(list)  # the run of a seed that made the synthetic set is its slowest
            for r in sel:
                per_seed[r["run"]["seed"]].append(run_wall_s(r))
            firsts = [max(v) for v in per_seed.values()]
            if firsts:
                value = -max(firsts)
                shown = f"{-value:.1f} s (n={len(firsts)})"
        if value is None:
            status = "open (no runs)"
        elif n_seeds < seeds:
            status = f"open ({n_seeds} of {seeds} seeds)"
        else:
            status = "met" if value >= goal else "**not met**"
        rows.append(f"| {label} | {shown} | {status} |")
    rows += qat_baseline_rows(recs)
    rows += sadag_target_rows(recs)
    rows += vit_target_rows(recs)
    return ["## Targets", "",
            "Computed from the runs below (default budget; `first setting` = a run that made its synthetic set). "
            "A target counts only runs evaluated on the whole eval set (JPEG-CIFAR-10: 10,000 images; "
            "ImageNet sample: 1,000) and, where it names seeds, that many distinct seeds with a recorded top-1; "
            "mean ± std, n, min and max are over those seeds.",
            "", "| target | measured | status |", "|---|---|---|", *rows, ""]


def family_goal(recipe: str, bits: str, proto: str = "qat") -> float | None:
    """The target a budget curve's row is held to at ``bits`` (from ``TARGETS``): under ``qat``, that of
    ``recipe``'s QAT family (the generator family's for a generator recipe, else the noise-optimization
    family's; ``qat-zeroq`` is that family's baseline); under another protocol, the recipe's own target."""
    if proto != "qat":
        return next((goal for _, _, recipes, p, b, stat, goal, _ in TARGETS
                     if recipes == recipe and p == proto and b == bits and stat == "top1"), None)
    fam = GENERATOR_RECIPES if recipe in GENERATOR_RECIPES else NOISE_OPT_RECIPES
    return next((goal for _, _, recipes, p, b, stat, goal, _ in TARGETS
                 if recipes == fam and p == "qat" and b == bits and stat == "top1_best"), None)
