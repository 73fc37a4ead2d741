"""Mixed precision without data (issue 38): uniform W_b against ``--wbits-avg b`` at the same weight memory.

Each run is ``python -m zsq quantize cifar10_resnet20 --recipe R --protocol ptq --a A --seed S --budget B``
with ``--w b`` (uniform) or ``--wbits-avg b [--mp-sensitivity K]`` (mixed), evaluated on the 10,000 images
of JPEG-CIFAR-10; its zsq.json, command, date and load average go to ``bench/runs/mixed/<run_id>.json``
(a run whose file exists is skipped: resumable). The uniform and mixed runs of one (recipe, seed, budget)
read the same cached synthetic set (``ZSQ_CACHE``), so they differ only in the weight bits.
``python bench/report.py`` renders the table (bench/results/mixed.py).

    OMP_NUM_THREADS=1 python bench/mixed_precision.py [--seeds 0] [--recipes zeroq] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
RUNS = CHECKOUT / "bench" / "runs" / "mixed"
EVAL = "cifar10-jpeg/test.tar"

#: model -> (protocol, eval set under ZSQ_HOME): ResNet-20 as issue 38's CIFAR targets, EfficientNet-Lite0
#: under ``fixed`` on the 1,000 val256 images as its ImageNet-class target
MODELS = {"cifar10_resnet20": ("ptq", EVAL), "efficientnet_lite0": ("fixed", "imagenet-sample/val256.tar")}

#: recipe -> (weight budget b, activation bits): issue 38's comparisons
SETTINGS = {"zeroq": (3, 8), "genie": (2, 4), "squant": (4, 8), "udfc": (4, 8), "dfq": (4, 8)}


def run_id(recipe: str, seed: int, budget: str, mode: str, wb: int, a: int, model: str = "cifar10_resnet20") -> str:
    return f"{model}__{recipe}__{MODELS[model][0]}__{mode}{wb}A{a}__{budget}__s{seed}"


def one(recipe: str, seed: int, budget: str, mode: str, threads: int, home: str, wb: float | None = None,
        model: str = "cifar10_resnet20") -> Path | None:
    protocol, evalset = MODELS[model]
    w0, a = SETTINGS[recipe]
    wb = w0 if wb is None else (int(wb) if float(wb).is_integer() else float(wb))
    if mode == "uniform" and not isinstance(wb, int):
        return RUNS  # no uniform model at a fractional width
    rid = run_id(recipe, seed, budget, {"uniform": "W", "kl": "Wavg-kl-", "hessian": "Wavg-hessian-"}[mode], wb, a,
                 model)
    dest = RUNS / f"{rid}.json"
    if dest.exists():
        print(f"skip {rid} (done)")
        return dest
    bits = ["--w", str(wb)] if mode == "uniform" else ["--wbits-avg", str(wb), "--mp-sensitivity", mode]
    with tempfile.TemporaryDirectory(prefix="zsq-mixed-") as tmp:
        out = Path(tmp) / "OUT"
        cmd = [sys.executable, "-m", "zsq", "quantize", model, "--recipe", recipe, "--protocol", protocol,
               *bits, "--a", str(a), "--seed", str(seed), "--budget", budget, "--threads", str(threads),
               "--eval-data", f"{home}/{evalset}", "-o", str(out), "--quiet"]
        load = os.getloadavg()[0]
        t0 = time.time()
        print("run", " ".join(cmd[2:]), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
            return None
        z = json.loads((out / "zsq.json").read_text())
    rec = {"run": {"model": model, "recipe": recipe, "protocol": protocol, "mode": mode, "w": wb, "a": a,
                   "seed": seed, "budget": budget, "eval": evalset},
           "run_id": rid,
           "command": "zsq " + " ".join(cmd[3:-3]).replace(home, "$ZSQ_HOME") + " -o OUT --quiet",
           "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "process_wall_s": round(time.time() - t0, 1),
           "load_avg": round(load, 2), "zsq": z}
    RUNS.mkdir(parents=True, exist_ok=True)
    tmpf = dest.with_suffix(".json.tmp")
    tmpf.write_text(json.dumps(rec, indent=1) + "\n")
    tmpf.replace(dest)
    print(f"done {rid}: top1 {z['metrics']['top1']}", flush=True)
    return dest


def plot(runs_dir: Path = RUNS, out: Path | None = None) -> Path | None:
    """Top-1 against weight memory (q bytes): the uniform points and the mixed ones of each recipe and seed 0,
    ``RUNS/accuracy_vs_size.png``."""
    from collections import defaultdict

    from zsq.report import plot_accuracy_size

    recs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    recs = [r for r in recs if r["run"]["seed"] == 0 and r["run"].get("model", "cifar10_resnet20") == "cifar10_resnet20"]
    if not recs:
        return None
    lines = defaultdict(list)
    for r in recs:
        lines[(f"{r['run']['recipe']} A{r['run']['a']}: ", r["run"]["mode"])].append(
            (r["zsq"]["size"]["q_bytes"], r["zsq"]["metrics"]["top1"], r["run"]["w"]))
    out = out or runs_dir / "accuracy_vs_size.png"
    plot_accuracy_size(lines, out, ylabel="top-1 on the 10,000 JPEG-CIFAR-10 test images (%)",
                       title="ResNet-20, protocol ptq, seed 0: accuracy against weight memory (labels: W or mean W)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar10_resnet20", choices=sorted(MODELS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--recipes", default="zeroq")
    ap.add_argument("--modes", default="uniform,kl,hessian")
    ap.add_argument("--budget", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", action="store_true", help="only draw RUNS/accuracy_vs_size.png from the runs")
    ap.add_argument("--wbits", default=None, help="weight budgets to run, e.g. 2,2.5,3,4 (default: the recipe's)")
    args = ap.parse_args(argv)
    if args.plot:
        print(plot())
        return 0
    home = os.environ.get("ZSQ_HOME")
    if not home:
        print("error: set ZSQ_HOME to the shared assets (cifar10-jpeg/test.tar)", file=sys.stderr)
        return 2
    failed = 0
    for seed in [int(s) for s in args.seeds.split(",")]:
        for recipe in args.recipes.split(","):
            for wb in ([float(x) for x in args.wbits.split(",")] if args.wbits else [None]):
                for mode in args.modes.split(","):
                    failed += one(recipe, seed, args.budget, mode, args.threads, home, wb, args.model) is None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
