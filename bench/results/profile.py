"""``bench/profile_genie.py``: where Genie's CPU time goes on EfficientNet-Lite0 (issue 36 item 3)."""

from __future__ import annotations

import json
from pathlib import Path

#: operator-name fragments -> the kind of work (first match wins); the rest is "other"
OP_KINDS = (("convolution", ("conv", "mkldnn_convolution")), ("batch norm", ("batch_norm",)),
            ("elementwise / activation", ("mul", "add", "sub", "div", "sigmoid", "silu", "relu", "hardtanh",
                                           "clamp", "where", "pow", "sqrt", "neg", "exp", "lerp", "abs")),
            ("reductions", ("sum", "mean", "var", "std", "max", "min", "norm")),
            ("copies / layout", ("copy", "contiguous", "to", "cat", "pad", "clone", "empty", "fill", "zero",
                                 "index", "gather", "slice", "view", "reshape", "permute", "expand")))


def _kind(op: str) -> str:
    name = op.lower()
    for kind, frags in OP_KINDS:
        if any(f in name for f in frags):
            return kind
    return "other"


def _shares(ops: list[dict], total: float) -> str:
    agg: dict[str, float] = {}
    for o in ops:
        agg[_kind(o["op"])] = agg.get(_kind(o["op"]), 0.0) + o["self_cpu_s"]
    parts = sorted(agg.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in parts if total)


def profile_section(d: Path) -> list[str]:
    files = sorted(Path(d).glob("*_genie_cpu.json")) if Path(d).is_dir() else []
    out: list[str] = []
    for f in files:
        r = json.loads(f.read_text())
        s, q = r["synthesis"], r["reconstruction"]
        out += [f"## Where Genie's CPU time goes: {r['model']} (`bench/profile_genie.py`)", "",
                f"`{r['command']}` on {r['cpu']} ({r['cores']} cores), torch {r['torch']}, {r['threads']} thread(s); the "
                f"machine was shared with other jobs (1-minute load average {r['load_avg_start'][0]} at the start, "
                f"{r['load_avg_end'][0]} at the end), so wall times are inflated and CPU s is the better measure. "
                "Reduced budget, profiled under cProfile + torch.profiler (both add overhead): Genie-D synthesis "
                f"of one batch of {s['batch']} images at 224 px, {s['iters']} iterations after a 1-iteration "
                f"warm-up ({s['precision']}, channels_last), then `zsq.quantize(..., 'genie', 4, 4)` on those "
                f"images with {q['iters_per_unit']} Genie-M steps per unit (MSE observers, batch 8, fp32).", "",
                f"**Synthesis**: {s['wall_s']} s wall, {s['cpu_s']} CPU s ({s['s_per_iter_upper']} s per iteration "
                f"including set-up). Operators by self time (torch.profiler's time inside each operator, wall clock on the "
                f"loaded machine; {s['op_self_cpu_total_s']} s in all): "
                f"{_shares(s['ops'], s['op_self_cpu_total_s'])} (top {len(s['ops'])} operators).", "",
                "| operator | self time s | calls |", "|---|---|---|"]
        out += [f"| `{o['op']}` | {o['self_cpu_s']} | {o['calls']} |" for o in s["ops"][:10]]
        out += ["", f"**Reconstruction** (calibration, unit inputs and {q['iters_per_unit']} steps per unit): "
                f"{q['wall_s']} s wall, {q['cpu_s']} CPU s. Operators: {_shares(q['ops'], q['op_self_cpu_total_s'])}. "
                "zsq's functions by cumulative time (share of the wall):", "",
                "| function | cumulative s | share | calls |", "|---|---|---|---|"]
        out += [f"| `{fn['fn']}` | {fn['cum_s']} | {100 * (fn['cum_share'] or 0):.0f} % | {fn['calls']} |"
                for fn in q["functions"][:14]]
        for note in r.get("notes", []):
            out += ["", note]
        out.append("")
    return out
