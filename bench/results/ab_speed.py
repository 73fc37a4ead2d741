"""``bench/ab_speed.py``: wall and CPU seconds of ``zsq quantize`` from a baseline checkout and this one,
alternated on one machine (issue 36's "no recipe slower than today")."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .common import shown_path


def ab_speed_section(d: Path) -> list[str]:
    files = sorted(d.glob("*.json"))
    if not files:
        return []
    out = ["## CPU speed against the baseline (`bench/ab_speed.py`, issue 36)", "",
           "Each configuration runs alternately from a worktree of the baseline commit and from the head (order "
           "swapped every repeat), one thread, a fresh `ZSQ_CACHE` per run (synthesis timed), no evaluation; "
           "wall and CPU seconds are zsq.json's `wall_s` / `cpu_s`, medians over the repeats. On a loaded machine "
           "the CPU seconds are the better comparison (wall seconds take the other processes' share).", ""]
    for p in files:
        r = json.loads(p.read_text())
        out += [f"Baseline {r['base']} against head {r['head']}, {r['cpu']}, {r['repeats']} repeats per side, "
                f"{r['date']} UTC; record `{shown_path(p)}`." + (f" Note: {r['note']}." if r.get("note") else ""), "",
                "| configuration | base wall s | head wall s | head/base wall | base CPU s | head CPU s | head/base CPU | load |",
                "|---|---|---|---|---|---|---|---|"]
        for name, c in r["configs"].items():
            med = {s: (statistics.median(x["wall_s"] for x in v), statistics.median(x["cpu_s"] for x in v))
                   for s, v in c["runs"].items()}
            loads = sorted(x["load_avg"] for v in c["runs"].values() for x in v)
            out.append(f"| `{' '.join(c['args'])}` | {med['base'][0]:.2f} | {med['head'][0]:.2f} | "
                       f"{med['head'][0] / med['base'][0]:.3f} | {med['base'][1]:.2f} | {med['head'][1]:.2f} | "
                       f"{med['head'][1] / med['base'][1]:.3f} | {loads[0]}–{loads[-1]} |")
        out.append("")
    return out
