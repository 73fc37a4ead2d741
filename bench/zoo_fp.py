"""Full-precision references of the ImageNet zoo models (issue 36 item 2): ``zsq eval MODEL`` on the
1,000-image ImageNet sample (``imagenet-sample/val256.tar``, one validation image per class), top-1 and
top-5, with the wall time, the machine and its load.

One JSON per model under ``bench/runs/zoo-fp/`` (resumable: an existing file is kept unless --force);
``zsq bench report`` renders them into docs/results.md. Run from the repository root:

    ZSQ_HOME=../shared/assets ZSQ_CACHE=... python bench/zoo_fp.py [--models efficientnet_lite0,...] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from zsq.api import software_versions
from zsq.hardware import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "runs" / "zoo-fp"
DATA = Path(os.environ.get("ZSQ_HOME", ROOT.parent / "shared" / "assets")) / "imagenet-sample" / "val256.tar"
MODELS = ("efficientnet_lite0", "efficientnet_lite2")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="measure again even if the JSON exists")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        dest = RUNS / f"{model}.json"
        if dest.is_file() and not args.force:
            print(f"{dest} exists: kept")
            continue
        cmd = [sys.executable, "-m", "zsq", "eval", model, "--eval-data", str(DATA), "--threads",
               str(args.threads), "--device", "cpu", "-q"]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"{model}: zsq eval failed:\n{r.stderr[-2000:]}")
        top1 = float(re.search(r"top1 ([\d.]+)", r.stdout).group(1))
        top5 = float(re.search(r"top5 ([\d.]+)", r.stdout).group(1))
        n = int(re.search(r"\(n=(\d+)\)", r.stdout).group(1))
        import zsq.models  # noqa: F401 - the zoo entry's preprocessing, as the run used it
        from zsq.models.registry import ZOO

        pre = ZOO[model].preprocess.to_dict()
        rec = {"model": model, "top1": top1, "top5": top5, "n": n, "data": "imagenet-sample/val256.tar",
               "preprocess": pre, "command": "zsq eval " + " ".join(cmd[4:]).replace(str(DATA), DATA.name),
               "wall_s": round(wall, 1), "threads": args.threads, "eval_workers": os.environ.get("ZSQ_EVAL_WORKERS"),
               "cpu": cpu_name(), "cores": os.cpu_count(), "load_avg": round(load, 2),
               "versions": software_versions()}
        dest.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"{model}: top1 {top1:.2f} top5 {top5:.2f} (n={n}, {wall:.0f} s, load {load:.1f})")


if __name__ == "__main__":
    main()
