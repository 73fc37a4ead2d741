"""A/B wall time of ``zsq quantize`` between two checkouts of zsq on this CPU (issue 36's "no recipe slower
than today"): each configuration runs alternately from the baseline checkout and from this one, ``--repeats``
times each, one thread, a fresh ``ZSQ_CACHE`` per run (so synthesis is timed), no evaluation; the per-run
wall seconds (zsq.json ``wall_s``) and CPU seconds go to ``bench/runs/ab-speed/<base>__<head>.json``.

    python bench/ab_speed.py --base-src /tmp/ab-base/src [--repeats 2]

``--base-src`` is the ``src`` folder of a worktree of the baseline commit (``git worktree add /tmp/ab-base C``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
RUNS = CHECKOUT / "bench" / "runs" / "ab-speed"

#: name -> zsq quantize arguments after the model: the families whose loops issue 36 touched
CONFIGS = {
    "squant-fixed-W4A4": ["cifar10_resnet20", "--recipe", "squant", "--protocol", "fixed", "--w", "4", "--a", "4"],
    "zeroq-ptq-W4A8": ["cifar10_resnet20", "--recipe", "zeroq", "--protocol", "ptq", "--w", "4", "--a", "8"],
    "genie-smoke-W4A4": ["cifar10_resnet20", "--recipe", "genie", "--protocol", "genie-native", "--w", "4", "--a", "4",
                         "--budget", "smoke"],
    "qat-zeroq-smoke-W4A4": ["cifar10_resnet20", "--recipe", "qat-zeroq", "--protocol", "qat", "--w", "4", "--a", "4",
                             "--budget", "smoke"],
}


def commit_of(src: Path) -> str:
    return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def one(src: Path, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="zsq-ab-") as tmp:
        env = dict(os.environ, PYTHONPATH=str(src), ZSQ_CACHE=f"{tmp}/cache", OMP_NUM_THREADS="1")
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "zsq", "quantize", *args, "--seed", "0", "--threads", "1",
                            "-o", f"{tmp}/OUT", "--quiet"], env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode:
            raise SystemExit(f"{src}: {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1:]}")
        z = json.loads(Path(f"{tmp}/OUT/zsq.json").read_text())
    return {"process_wall_s": round(wall, 2), "wall_s": z["wall_s"], "cpu_s": z["cpu_s"],
            "load_avg": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-src", required=True, type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    a = ap.parse_args(argv)
    head_src = CHECKOUT / "src"
    base, head = commit_of(a.base_src), commit_of(head_src)
    names = a.only.split(",") if a.only else list(CONFIGS)
    rec = {"base": base, "head": head, "threads": 1, "repeats": a.repeats, "cpu": None,
           "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "configs": {}}
    for name in names:
        runs = {"base": [], "head": []}
        for i in range(a.repeats):
            order = [("base", a.base_src), ("head", head_src)] if i % 2 == 0 else [("head", head_src),
                                                                                  ("base", a.base_src)]
            for side, src in order:
                runs[side].append(one(src, CONFIGS[name]))
                print(name, side, runs[side][-1], flush=True)
        med = {s: statistics.median(r["wall_s"] for r in v) for s, v in runs.items()}
        rec["configs"][name] = {"args": CONFIGS[name], "runs": runs, "median_wall_s": med,
                                "head_over_base": round(med["head"] / med["base"], 3)}
        print(name, "head/base", rec["configs"][name]["head_over_base"], flush=True)
    from zsq.hardware import cpu_name

    rec["cpu"] = cpu_name()
    RUNS.mkdir(parents=True, exist_ok=True)
    out = RUNS / f"{base}__{head}.json"
    if out.is_file():  # another --only call of the same pair: keep its configurations
        old = json.loads(out.read_text())
        rec["configs"] = {**old.get("configs", {}), **rec["configs"]}
        rec["repeats"] = ",".join(sorted({str(old.get("repeats")), str(a.repeats)}))
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
