"""``bench/peers/run.py``: Sony MCT and Qualcomm AIMET beside zsq's `fixed` rows."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .common import load_runs


#: zsq's rows beside the peers (`bench/peers/run.py`): synthesis-free recipes and zeroq, all under `fixed`
PEER_ZSQ_RECIPES = ("squant", "dfq", "udfc", "zeroq")


def peers_section(d: Path) -> list[str]:
    """Rows of ``bench/peers/run.py``: Sony MCT / Qualcomm AIMET (``bench/runs/peers/*.json``, each run in
    its own venv) beside zsq's `fixed` rows of the same model, bits, seed and eval set measured in the same
    run (``bench/runs/peers/zsq/*.json``; without that folder, the top-level ``bench/runs/*.json``), with
    each peer's protocol differences and wall times."""
    peers = load_runs(d)
    if not peers:
        return []
    zsq = []
    zsq_files = sorted((d / "zsq").glob("*.json")) or sorted(d.parent.glob("*.json"))
    for p in zsq_files:
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        run = r.get("run") or {}
        if (run.get("protocol") == "fixed" and run.get("recipe") in PEER_ZSQ_RECIPES and not run.get("calib")
                and not run.get("extra") and run.get("budget") == "default"):
            zsq.append(r)

    def peer_label(r: dict) -> str:
        label = f"{r['peer']} ({r.get('peer_package', '?')} {r.get('peer_version', '?')})"
        gen = (r.get("settings") or {}).get("data_generation")
        if gen and (gen.get("n_images"), gen.get("n_iter")) != (256, 500):
            label += f", {gen.get('n_images')} images x {gen.get('n_iter')} iterations"
        return label

    # (model, n_eval) -> (rank, label, seed) -> bits -> (top1, wall s, date)
    groups: dict[tuple, dict] = defaultdict(lambda: defaultdict(dict))
    bits_seen: dict[tuple, set] = defaultdict(set)
    keys = set()
    for r in peers:
        keys.add((r.get("model"), r.get("n_eval")))
    for r in peers:
        key, b = (r.get("model"), r.get("n_eval")), f"W{r.get('w')}A{r.get('a')}"
        cell = (r.get("top1"), r.get("wall_s_no_eval"), r.get("date", ""))
        row = groups[key][(1, peer_label(r), r.get("seed"))]
        if b not in row or cell[2] > row[b][2]:
            row[b] = cell
        bits_seen[key].add(b)
    for r in zsq:
        run, z = r["run"], r["zsq"]
        key, b = (run["model"], z.get("n_eval")), f"W{run['w']}A{run['a']}"
        if key not in keys:
            continue
        groups[key][(0, f"zsq {run['recipe']}", run["seed"])][b] = (
            (z.get("metrics") or {}).get("top1"), z.get("wall_s"), r.get("date", ""))
        bits_seen[key].add(b)

    order = ["W8A8", "W6A6", "W5A5", "W4A8", "W4A4", "W3A3", "W2A4", "W2A2"]
    out = ["## Peers side by side: Sony MCT and Qualcomm AIMET (`bench/peers/run.py`)", "",
           "Each peer ran in its own virtual environment on the same zsq model, the same eval images (zsq's "
           "loader) and zsq's top-1 code, first conv and last FC at 8 bits like `fixed`; the zsq rows are "
           "`fixed` runs of the same model, bits and seed made by the same run (`bench/runs/peers/zsq/`). Wall "
           "times are measured in the same run on the same machine (`bench/peers/run.py`; the dates below show when), so compare ratios, not absolute seconds. "
           "Cells: top-1 (wall s). Wall s = data (synthesis / MCT data generation / AIMET's noise) + "
           "quantization; evaluation, interpreter start and imports excluded for every row. Each peer keeps "
           "its own graph, quantizer types and activation placement: its differences from `fixed` are listed "
           "under the table.", ""]
    for key in sorted(groups, key=lambda k: (str(k[0]), k[1] or 0)):
        model, n_eval = key
        cols = [b for b in order if b in bits_seen[key]] + sorted(bits_seen[key] - set(order))
        out += [f"### {model} · top-1 on {n_eval} eval images", "",
                "| method | seed | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        dates = []
        for rank, label, seed in sorted(groups[key], key=lambda k: (k[0], k[1], k[2] if k[2] is not None else -1)):
            row = groups[key][(rank, label, seed)]
            cells = []
            for c in cols:
                if c not in row or row[c][0] is None:
                    cells.append("—")
                    continue
                top1, wall, date = row[c]
                dates.append(date)
                cells.append(f"{top1:.2f} ({wall:.1f} s)" if isinstance(wall, (int, float)) else f"{top1:.2f}")
            out.append(f"| {label} | {seed} | " + " | ".join(cells) + " |")
        dates = sorted(x for x in dates if x)
        if dates:
            out += ["", f"Measured {dates[0]} to {dates[-1]}."]
        out.append("")
    notes = {}
    for r in peers:
        notes.setdefault(peer_label(r), (r.get("method", "—"), r.get("protocol_note", "—")))
    out += ["| peer | method | protocol differences from zsq `fixed` |", "|---|---|---|"]
    out += [f"| {label} | {method} | {note} |" for label, (method, note) in sorted(notes.items())]
    return out + [""]
