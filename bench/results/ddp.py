"""``bench/ddp_throughput.py``: 1 vs N processes (torchrun, gloo) for sharded synthesis and DDP QAT."""

from __future__ import annotations

import json
from pathlib import Path


def ddp_section(f: Path) -> list[str]:
    """``bench/ddp_throughput.py``: 1 vs N processes (torchrun, gloo) for sharded synthesis and DDP QAT."""
    if not f.is_file():
        return []
    doc = json.loads(f.read_text())
    st, m = doc.get("settings", {}), doc.get("machine", {})
    out = ["## torch.distributed: 1 vs 2 processes (`bench/ddp_throughput.py`)", "",
           f"{st.get('model')}, {m.get('cpu')} ({m.get('cores')} cores). `PxT` = P processes (torchrun "
           "--standalone, gloo) of T intra-op threads each. `synth`: `zeroq` synthesis sharded over the ranks "
           f"({st.get('synth_batches')} batches of {st.get('synth_batch')} images x {st.get('synth_iters')} "
           "iterations; the gathered set is identical for every P), start-up and model loading excluded. `qat`: "
           f"the `qat-kd` engine at W4A4, global batch {st.get('qat_batch')}, mean of {st.get('qat_steps')} "
           "steps after the EMA warm-up step and the first training step. Throughput relative to one process "
           "on the same cores. `load before` = the 1-minute load average when the row started (it includes the "
           "decaying load of the previous row; above the core count, another job shared the machine).", "",
           "| task | PxT | images/s | vs 1 process, same cores | vs 1x1 | load before |", "|---|---|---|---|---|---|"]
    sp = doc.get("speedup", {})

    def fmt(v):
        return "—" if v is None else f"{v:.2f}x"

    for r in doc.get("rows", []):
        c = sp.get(r["task"], {}).get(f"{r['procs']}x{r['threads_per_proc']}", {})
        out.append(f"| {r['task']} | {r['procs']}x{r['threads_per_proc']} | {r['images_per_s']:.2f} | "
                   f"{fmt(c.get('vs_1proc_same_cores'))} | {fmt(c.get('vs_1x1'))} | {r['loadavg_before'][0]:.2f} |")
    return out + [""]
