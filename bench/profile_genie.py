"""Where Genie's CPU time goes on EfficientNet-Lite0 (issue 36 item 3), at a reduced budget.

Two parts, each profiled with ``cProfile`` (zsq's functions: cumulative time) and ``torch.profiler`` (the
operators: self CPU time), on the CPU:

* **synthesis**: Genie-D (``zsq.synthesize(model, "genie")``) at 224 px, one batch of ``--batch`` images,
  ``--synth-iters`` iterations after a 1-iteration warm-up run (the default budget's settings otherwise:
  precision ``auto``, channels_last);
* **reconstruction**: ``zsq.quantize(model, "genie", 4, 4)`` on ``--recon-images`` of those images with
  ``--recon-iters`` Genie-M steps per unit (the default budget's settings otherwise: MSE observers,
  batch 8, fp32): the calibration, the unit inputs and the per-unit optimisation together.

Writes ``bench/runs/profile/<model>_genie_cpu.json`` (the tables, the command, the machine and its load);
``bench/results/profile.py`` renders it into docs/results.md.

    ZSQ_HOME=../shared/assets OMP_NUM_THREADS=1 python bench/profile_genie.py [--threads 1]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "runs" / "profile"


def _op_table(prof, n: int) -> tuple[list[dict], float]:
    rows = []
    total = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        rows.append({"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count})
    rows.sort(key=lambda r: -r["self_cpu_s"])
    return rows[:n], round(total / 1e6, 3)


def _fn_table(pr: cProfile.Profile, n: int, total: float) -> list[dict]:
    st = pstats.Stats(pr)
    rows = []
    for (file, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
        if "zsq" not in file and "bench" not in file:
            continue
        rel = file.split("src/")[-1] if "src/zsq" in file else Path(file).name
        rows.append({"fn": f"{rel}:{line} {name}", "cum_s": round(ct, 3), "self_s": round(tt, 3), "calls": nc,
                     "cum_share": round(ct / total, 3) if total else None})
    rows.sort(key=lambda r: -r["cum_s"])
    return rows[:n]


def profile(fn, n_ops: int = 15, n_fns: int = 25) -> dict:
    import torch.profiler as tp

    pr = cProfile.Profile()
    t0, c0 = time.perf_counter(), time.process_time()
    with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
        pr.enable()
        fn()
        pr.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ops, op_total = _op_table(prof, n_ops)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "op_self_cpu_total_s": op_total, "ops": ops,
            "functions": _fn_table(pr, n_fns, wall)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--synth-iters", type=int, default=4)
    ap.add_argument("--recon-images", type=int, default=8)
    ap.add_argument("--recon-iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    import torch

    import zsq
    from zsq.hardware import cpu_name, resolve_precision
    from zsq.synth import synthesize

    torch.set_num_threads(a.threads)
    os.environ["ZSQ_CACHE"] = tempfile.mkdtemp(prefix="zsq-profile-")
    load0 = [round(x, 2) for x in os.getloadavg()]
    model = zsq.load_model(a.model)
    synthesize(model, "genie", budget="default", seed=0, n_images=a.batch, progress=False,
               overrides={"batch_size": a.batch, "iters": 1})  # warm-up (oneDNN primitives, allocator)
    os.environ["ZSQ_CACHE"] = tempfile.mkdtemp(prefix="zsq-profile-")
    box = {}

    def synth():
        box["set"] = synthesize(model, "genie", budget="default", seed=1, n_images=a.batch, progress=False,
                                overrides={"batch_size": a.batch, "iters": a.synth_iters})

    syn = profile(synth)
    syn.update({"batch": a.batch, "iters": a.synth_iters, "precision": resolve_precision("auto"),
                "s_per_iter_upper": round(syn["wall_s"] / a.synth_iters, 2)})

    def recon():
        zsq.quantize(model, "genie", 4, 4, synthetic=str(box["set"].dir), budget="default", progress=False,
                     hparams={"iters": a.recon_iters}, device="cpu")

    rec = profile(recon)
    rec.update({"images": a.batch, "iters_per_unit": a.recon_iters})
    record = {
        "command": (f"OMP_NUM_THREADS=1 ZSQ_HOME=../shared/assets python bench/profile_genie.py --model {a.model} "
                    f"--batch {a.batch} --synth-iters {a.synth_iters} --recon-images {a.recon_images} "
                    f"--recon-iters {a.recon_iters} --threads {a.threads}"),
        "model": a.model, "threads": a.threads, "cpu": cpu_name(), "cores": os.cpu_count(),
        "load_avg_start": load0, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__, "synthesis": syn, "reconstruction": rec,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{a.model}_genie_cpu.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}: synthesis {syn['wall_s']} s wall / {syn['cpu_s']} CPU s, reconstruction {rec['wall_s']} s "
          f"wall / {rec['cpu_s']} CPU s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
