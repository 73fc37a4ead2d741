"""``bench/gpu_check.sh`` / ``bench/gpu_paper.sh`` (issue 36 item 5): their summaries, committed as
``bench/runs/gpu/gpu_check.json`` and ``gpu_paper.json``."""

from __future__ import annotations

import json
from pathlib import Path


def _machine(m: dict) -> str:
    gpu = f"{m.get('gpu')} ({m.get('gpu_memory_gib')} GiB, CUDA {m.get('cuda')})" if m.get("gpu") else "no GPU"
    return f"{gpu}; CPU {m.get('cpu')} ({m.get('cpu_count')} cores), torch {m.get('torch')}, load {m.get('loadavg')}"


def gpu_section(d: Path) -> list[str]:
    d = Path(d)
    files = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("gpu_*.json"))} if d.is_dir() else {}
    files = {k: v for k, v in files.items() if v.get("mode") == "gpu"}
    out = ["## On a GPU (`bench/gpu_check.sh`, `bench/gpu_paper.sh`)", ""]
    if not files:
        return out + ["No GPU run yet: no GPU machine was available while issue 36 was worked on. The two scripts are "
                      "ready (README, Devices: how to run them with the device tool) and are kept working by their "
                      "`--cpu-smoke` mode in `tests/test_gpu_scripts.py`; their summaries go to `bench/runs/gpu/`.", ""]
    check = files.get("gpu_check")
    if check:
        out += [f"`bench/gpu_check.sh` on {_machine(check['machine'])}; pending: "
                f"{', '.join(check['pending']) or 'none'}.", "", "| step | status | result |", "|---|---|---|"]
        for r in check["steps"]:
            if r["kind"] == "pytest":
                res = ", ".join(f"{k} {v}" for k, v in sorted(r.get("counts", {}).items()))
            elif r["kind"] == "timing":
                s, q = r.get("synth", {}), r.get("recon", {})
                res = (f"synthesis {s.get('s_per_iter')} s/iter (batch {s.get('batch')}, {s.get('precision')}); "
                       f"reconstruction {q.get('s_per_step_all_units')} s per step of every unit (batch {q.get('batch')})")
            else:
                m = (r.get("result") or {}).get("metrics") or {}
                res = f"top-1 {m['top1']:.1f} on {r['result'].get('n_eval')} images" if m else (r.get("error") or "")[-120:]
            out.append(f"| {r['step']} | {r['status']} | {res} |")
        out.append("")
    paper = files.get("gpu_paper")
    if paper:
        out += [f"`bench/gpu_paper.sh` (Genie, `paper` budget, seed 0) on {_machine(paper['machine'])}; pending: "
                f"{', '.join(paper['pending']) or 'none'}.", "",
                "| step | status | top-1 | eval images | zsq wall s | calls |", "|---|---|---|---|---|---|"]
        for r in paper["steps"]:
            z = r.get("result") or {}
            m = z.get("metrics") or {}
            out.append(f"| {r['step']} | {r['status']} | {m.get('top1', '—')} | {z.get('n_eval', '—')} | "
                       f"{z.get('wall_s', '—')} | {r.get('calls')} |")
        out.append("")
    return out
