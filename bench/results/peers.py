"""``bench/peers/run.py``: Sony MCT and Qualcomm AIMET beside zsq's `fixed` rows; ``--mixed``: MCT's mixed
precision beside zsq's `ptq` mixed-precision rows at the same weight memory."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .common import fmt_seeds, load_runs


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


#: the weight widths the issue 38 comparison matches: (w, a) -> zsq recipe of the target
MIXED_TARGETS = {(3, 8): "zeroq", (2, 4): "genie"}


def _uniform_memory(r: dict) -> dict:
    """An MCT uniform row (no ``mixed`` entry) in the shape of a mixed one: its recorded ``weight_memory``
    (both counts of the layout MCT applied) against itself, the searched mean = its W."""
    mem = r.get("weight_memory")
    return {"achieved": mem, "target": mem, "searched_mean_w": r["w"]} if mem else {"searched_mean_w": r["w"]}


def peers_mixed_section(d: Path, zsq_dir: Path) -> list[str]:
    """Rows of ``bench/peers/run.py --mixed``: MCT's mixed-precision PTQ (``bench/runs/peers/mixed/*.json``) at the
    weight memory of uniform W{w}, beside zsq's `ptq` uniform and ``--wbits-avg`` rows of the same model and bits
    (``bench/runs/mixed/``, ``bench/mixed_precision.py``), with the memory conversion, MCT's per-layer bits and
    the protocol differences (issue 38 item 5)."""
    peers = load_runs(d)
    if not peers:
        return []
    settings = {(r.get("model"), r.get("w"), r.get("a")) for r in peers}
    zsq = [r for r in load_runs(zsq_dir)
           if (r["run"]["model"], r["run"]["w"], r["run"]["a"]) in settings and r["run"].get("budget") == "default"
           and r["run"].get("protocol") == "ptq" and not r["run"].get("eval_limit")]

    def mean(v):
        return f"{statistics.mean(v):.1f}" if v else "—"

    out = ["## MCT mixed precision at the same weight memory (`bench/peers/run.py --mixed`, issue 38)", "",
           "Sony MCT's own mixed-precision PTQ (`MixedPrecisionQuantizationConfig()` with MCT's defaults, "
           "`ResourceUtilization(weights_memory=T)`) on the same ResNet-20, eval images and top-1 code, beside "
           "zsq's `ptq` rows of `bench/mixed_precision.py` at the same bits. T is the weight memory of the uniform "
           "W{w} layout (first conv and last linear at 8 bits) as MCT counts it: kernels only, numel x bits / 8 "
           "(MCT's docs: the bias is not counted, nor are the per-channel thresholds). zsq's q bytes count the "
           "packed kernels plus 8 bytes per output channel (fp32 scale and zero point) and the fp32 biases of the "
           "BN-folded model: 698 output channels x 12 bytes = 8,376 bytes on ResNet-20, the same for every bit "
           "layout, so T = zsq's uniform q bytes - 8,376 (W3: 109,672 -> 101,296; W2: 76,264 -> 67,888) and MCT's "
           "chosen layout, recounted with zsq's rule, is the `q bytes` column. Top-1 on the 10,000 JPEG-CIFAR-10 "
           "test images. Wall and CPU s (means over the seeds) = data + search + quantization, evaluation excluded: "
           "zsq rows as in the mixed-precision section (zsq's run wall/CPU seconds; a run that read its synthetic "
           "set from the cache holds no synthesis), MCT rows MCT's data generation (measured when the images were "
           "made; the bit settings of a seed share them) + MCT's search and quantization. Load = 1-minute load "
           "average at the start on the shared 2-core machine (MCT rows: at the generation / at the row), so wall "
           "seconds are inflated and CPU seconds are the better measure.", ""]
    groups: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for r in zsq:
        run = r["run"]
        mode = run.get("mode", "uniform")
        label = f"zsq {run['recipe']} " + ("uniform" if mode == "uniform" else f"--wbits-avg, {mode} sensitivity")
        groups[(run["model"], run["w"], run["a"])][(0, label)].append(r)
    for r in peers:
        mx = r.get("mixed") or {}
        cands = "/".join(map(str, mx.get("candidates", [])))
        label = f"{r['peer']} ({r.get('peer_package', '?')} {r.get('peer_version', '?')}), " + (
            f"candidates {cands}" if mx else f"uniform W{r['w']}")
        gen = (r.get("settings") or {}).get("data_generation")
        if gen and (gen.get("n_images"), gen.get("n_iter")) != (256, 500):
            label += f", {gen.get('n_images')} images x {gen.get('n_iter')} iterations"
        if r.get("n_eval") != 10000:
            label += f", {r.get('n_eval')} eval images"
        groups[(r["model"], r["w"], r["a"])][(1, label)].append(r)
    bit_lines = []
    for key in sorted(groups, key=lambda k: (str(k[0]), -k[1], -k[2])):
        model, w, a = key
        target = MIXED_TARGETS.get((w, a))
        out += [f"### {model} · weight memory of uniform W{w} · A{a}"
                + (f" (issue 38: zsq `{target}` --wbits-avg {w} --a {a} against MCT)" if target else ""), "",
                "| method | seeds | top-1 | q bytes (zsq count) | MCT weights_memory (target) | searched mean W | "
                "wall s | CPU s | load |", "|---|---|---|---|---|---|---|---|---|"]
        mode_order = ("uniform", "kl", "hessian")
        for rank, label in sorted(groups[key], key=lambda k: (k[0], [m in k[1] for m in mode_order].index(True)
                                                               if any(m in k[1] for m in mode_order) else 9, k[1])):
            rs = sorted(groups[key][(rank, label)], key=lambda r: r["run"]["seed"] if rank == 0 else r["seed"])
            if rank == 0:
                top1 = [r["zsq"]["metrics"]["top1"] for r in rs]
                seeds = [r["run"]["seed"] for r in rs]
                qb = sorted({r["zsq"]["size"]["q_bytes"] for r in rs})
                mw = sorted({(r["zsq"].get("mixed") or {}).get("wbits_avg", w) for r in rs})
                out.append(f"| {label} | {','.join(map(str, seeds))} | {fmt_seeds(top1)} | "
                           f"{', '.join(f'{x:,}' for x in qb)} | — | {', '.join(f'{x:g}' for x in mw)} | "
                           f"{mean([r['zsq']['wall_s'] for r in rs])} | {mean([r['zsq']['cpu_s'] for r in rs])} | "
                           f"{', '.join(str(r.get('load_avg')) for r in rs)} |")
                continue
            top1 = [r["top1"] for r in rs]
            mx = [r.get("mixed") or _uniform_memory(r) for r in rs]
            qb = sorted({m["achieved"]["zsq_q_bytes"] for m in mx if "achieved" in m})
            mb = sorted({(m["achieved"]["mct_weights_memory"], m["target"]["mct_weights_memory"])
                         for m in mx if "achieved" in m})
            mw = sorted({m["searched_mean_w"] for m in mx if "searched_mean_w" in m})
            loads = [f"{(r.get('data_generation_cached') or {}).get('load_avg', r.get('load_avg'))} / "
                     f"{r.get('load_avg')}" for r in rs]
            out.append(f"| {label} | {','.join(str(r['seed']) for r in rs)} | {fmt_seeds(top1)} | "
                       f"{', '.join(f'{x:,}' for x in qb)} | "
                       f"{', '.join(f'{g:,.0f} ({t:,.0f})' for g, t in mb)} | {', '.join(f'{x:g}' for x in mw)} | "
                       f"{mean([r['wall_s_no_eval'] for r in rs])} | {mean([r['cpu_s_no_eval'] for r in rs])} | "
                       f"{', '.join(loads)} |")
            for r, m in zip(rs, mx):
                if not r.get("mixed"):
                    continue
                bits = m.get("bits", {})
                bit_lines.append(f"- {r['peer']} W{w} memory, A{a}, candidates {'/'.join(map(str, m.get('candidates', [])))}, "
                                 f"seed {r['seed']}: " + " ".join(str(b) for b in bits.values()))
        out.append("")
    if bit_lines:
        out += ["MCT's chosen weight bits per layer (network order, conv1 first and the linear last, both pinned at "
                "8; zsq's own choices are listed in the mixed-precision section):", "", *bit_lines, ""]
    out += ["Protocol differences (beyond the equal weight memory):", "",
            "- Which layers are searched: the same in both, the 18 inner convolutions; the first conv and the last "
            "linear are pinned at 8 bits (MCT: manual bit-width selection). Candidates: zsq 2/3/4/6/8 (default); "
            "the MCT rows list theirs (default run: the same 2/3/4/6/8 through the TPC; MCT's IMX500 TPC itself "
            "offers 2/4/8, `--mp-bits 2,4,8`). With every candidate at 2 bits or more, the W2 budget leaves no "
            "choice: both searches return all-2 layouts, equal to uniform W2 in bits.",
            "- Objective and solver: zsq minimises the summed per-layer sensitivity (ZeroQ's KL of the output with "
            "one layer quantized, or the Hessian trace) measured on 128 images of the recipe's own synthetic set, "
            "solved exactly by `scipy.optimize.milp`. MCT (defaults): the distance between the float and the "
            "mixed model at its interest points (layer outputs, averaged), per layer and candidate, on 32 of its "
            "generated images, an ILP (PuLP/CBC), then its greedy refinement that raises bits while the target "
            "holds.",
            "- Activation bits: A at the same sites in both with the 8-bit ones of the protocol (stem output, "
            "classifier input); MCT's weights-only target keeps every activation at the TPC's base A (its own "
            "filter), so only weight bits are searched in both. MCT also quantizes the network input and the logits "
            "(8 bits) and each block's second conv output before the residual add (A bits); zsq `ptq` leaves them "
            "FP.",
            "- Quantizers: MCT weights symmetric per channel (MSE thresholds), activations with power-of-two "
            "thresholds, BN folded; zsq `ptq` weights asymmetric per channel, activations asymmetric per tensor, "
            "BN folded. MCT keeps one threshold per channel where zsq keeps a scale and a zero point; both are "
            "charged zsq's 8 bytes per channel above.",
            "- Data: MCT generates its own images (256 images x 500 iterations, its BN-statistics alignment, "
            "`bench/peers/README.md`) and calibrates and searches on them; zsq `zeroq` uses its distilled set for "
            "ranges and sensitivities, zsq `genie` its generator's images and block reconstruction. MCT's PTQ has "
            "no reconstruction (`--gptq` runs MCT's GPTQ after the search, peer `mct-gptq-mp`). No real images "
            "on either side.",
            ""]
    return out
