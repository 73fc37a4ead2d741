"""``bench/mixed_precision.py``: mixed-precision weight bits without data (issue 38) against uniform bits
at the same weight memory."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .common import fmt_seeds, load_runs, shown_path

MODES = {"uniform": "uniform", "kl": "mixed, KL sensitivity (ZeroQ)", "hessian": "mixed, Hessian trace (HAWQ-v2)"}


def mixed_section(d: Path) -> list[str]:
    """One row per (recipe, budget, bits, mode): top-1 over the seeds run, the weight memory, the search time."""
    recs = load_runs(d)
    if not recs:
        return []
    out = ["## Mixed precision without data (`bench/mixed_precision.py`, issue 38)", "",
           "JPEG-CIFAR-10 ResNet-20, protocol `ptq` (first conv and last linear pinned at W8, so the search "
           "covers the other 18 convolutions), top-1 on the 10,000 test images. `uniform` is `--w b`; the mixed "
           "rows are `--wbits-avg b`: each searched layer takes 2/3/4/6/8 bits, chosen by an exact integer program "
           "(`scipy.optimize.milp`) minimising the summed per-layer sensitivity, measured on the first 128 images "
           "of the recipe's own synthetic set (no real data), with the parameter-weighted mean over the searched "
           "layers at most b. Both rows of a seed read the same cached synthetic set and have the same weight "
           "memory (q bytes: packed weights + per-channel scales + FP biases). Search = sensitivities + solve, "
           "wall and CPU seconds, inside the run's wall time; the machine was shared with other agents (load = "
           "1-minute load average at the start on 2 cores), so wall seconds are inflated and CPU seconds are the "
           "better estimate (run CPU s includes the search; before `search CPU s` was recorded, the run's CPU seconds bound the search's). Runs use `--threads 1`. Uniform `zeroq` W3A8 at seed 0 is 72.90 here against 72.79 in the main tables: this synthetic set was made again by the current code (another cache key), and both rows here read this one.", "",
           "",
           "EfficientNet-Lite0 rows (model `efficientnet_lite0`): protocol `fixed`, top-1 on the 1,000 val256 "
           "images; the synthesis-free recipes (`udfc`, `dfq`, `squant`) have no synthetic set, so their "
           "sensitivities read 128 Gaussian images (seeded) at 224 px; everything else as above.", "",
           "At `--wbits-avg 2` with candidates 2/3/4/6/8 the only allocation is uniform W2 (every searched layer "
           "must take the smallest candidate: the W2 avg row equals the uniform W2 one, bit for bit), so a mixed "
           "model at uniform W2's weight memory cannot differ from the uniform one unless a candidate below 2 bits "
           "exists; the same holds for MCT's search at that memory (section below).", "",
           "| model | recipe | budget | bits | mode | seeds | top-1 | q bytes | searched mean W | search wall s | search CPU s | run wall s | run CPU s | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = defaultdict(list)
    for r in recs:
        run = r["run"]
        groups[(run.get("model", "cifar10_resnet20"), run["recipe"], run["budget"], run["w"], run["a"],
                run["mode"])].append(r)
    order = list(MODES)
    for key in sorted(groups, key=lambda k: (k[0] != "cifar10_resnet20", k[:5],
                                             order.index(k[5]) if k[5] in order else 9)):
        model, recipe, budget, w, a, mode = key
        rs = sorted(groups[key], key=lambda r: r["run"]["seed"])
        top1 = [r["zsq"]["metrics"]["top1"] for r in rs]
        seeds = ",".join(str(r["run"]["seed"]) for r in rs)
        qb = sorted({r["zsq"]["size"]["q_bytes"] for r in rs})
        mx = [r["zsq"].get("mixed") or {} for r in rs]
        mean_w = sorted({m["wbits_avg"] for m in mx if "wbits_avg" in m})
        s_wall = [m["search_s"] for m in mx if "search_s" in m]
        s_cpu = [m["search_cpu_s"] for m in mx if "search_cpu_s" in m]
        bits = f"W{w}A{a}" if mode == "uniform" else f"W{w} avg, A{a}"

        def avg(v):
            return f"{statistics.mean(v):.1f}" if v else "—"

        out.append(f"| {model} | {recipe} | {budget} | {bits} | {MODES.get(mode, mode)} | {seeds} | {fmt_seeds(top1)} | "
                   f"{', '.join(map(str, qb))} | {', '.join(f'{x:g}' for x in mean_w) or w} | {avg(s_wall)} | "
                   f"{avg(s_cpu)} | {avg([r['zsq']['wall_s'] for r in rs])} | {avg([r['zsq']['cpu_s'] for r in rs])} | "
                   f"{', '.join(str(r.get('load_avg')) for r in rs)} |")
    out += ["", "Per-layer weight bits of the mixed runs (layers in network order; the pinned first and last "
            "layers are at 8):", ""]
    for key in sorted(groups):
        if key[5] == "uniform":
            continue
        for r in sorted(groups[key], key=lambda r: r["run"]["seed"]):
            bits = (r["zsq"].get("mixed") or {}).get("bits", {})
            out.append(f"- {key[0]} {key[1]} {key[5]} W{key[3]} avg seed {r['run']['seed']}: "
                       + " ".join(str(b) for b in bits.values()))
    quiet = sorted((d.parent / "mixed-search").glob("*.json"))
    if quiet:
        out += ["", "Search time on an idle machine (target: under 60 s once the synthetic set exists; the table's "
                "wall seconds above were taken under load):", ""]
        for p in quiet:
            q = json.loads(p.read_text())
            out.append(f"- `{q['command']}` ({q['date']} UTC, {q['machine'].get('cpu')}, load {q['load_avg_before']} "
                       f"before): search {q['search_s']:.1f} s wall, {q['search_cpu_s']:.1f} s CPU "
                       f"({q['n_images']} synthetic images, sensitivity cache cold); top-1 {q['top1']:.2f}, whole run "
                       f"{q['time_real_s']:.0f} s wall. Record: `{shown_path(p)}`.")
    png = d / "accuracy_vs_size.png"
    if png.is_file():
        out += ["", f"Plot of top-1 against weight memory (seed 0, uniform and mixed points): `{shown_path(png)}` "
                "(`python bench/mixed_precision.py --plot`)."]
    return out + [""]
