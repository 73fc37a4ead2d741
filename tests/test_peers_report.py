"""The report's "Peers side by side" section (bench/peers/run.py rows); needs no peer venv."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_bench_results, load_bench_script

peers_section = load_bench_results("peers").peers_section
render = load_bench_script("report").render


def _peer(peer: str, w: int, a: int, top1: float, wall: float, note: str, **extra) -> dict:
    return {"peer": peer, "peer_package": f"{peer}-pkg", "peer_version": "9.9", "model": "cifar10_resnet20",
            "w": w, "a": a, "seed": 0, "n_eval": 10000, "top1": top1, "top5": 99.0,
            "wall_s": {"data_generation": wall / 2, "quantization": wall / 2, "eval": 3.0, "total": wall + 3.0},
            "wall_s_no_eval": wall, "date": "2026-01-01 10:00:00", "method": f"{peer} method",
            "protocol_note": note, **extra}


def _zsq(recipe: str, w: int, a: int, top1: float, wall: float, protocol: str = "fixed") -> dict:
    run = {"model": "cifar10_resnet20", "recipe": recipe, "protocol": protocol, "w": w, "a": a, "seed": 0,
           "budget": "default", "eval": "cifar10-jpeg/test.tar", "eval_limit": None, "calib": None, "calib_n": 256,
           "extra": []}
    rid = f"cifar10_resnet20__{recipe}__{protocol}__W{w}A{a}__default__s0"
    return {"run": run, "run_id": rid, "date": "2026-01-01 09:59:00", "load_avg": 1.0,
            "zsq": {"metrics": {"top1": top1, "top5": 99.0}, "n_eval": 10000, "wall_s": wall, "cpu_s": wall,
                    "machine": {"cpu": "test cpu", "threads": 2}, "versions": {"zsq": "0", "git": None, "torch": "0"},
                    "synthetic": None, "peak_rss_mb": 1.0}}


def _write(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_peers_section_rows_notes_and_zsq_beside(tmp_path: Path):
    runs = tmp_path / "runs"
    _write(runs / "peers" / "mct__W4A4__s0.json",
           _peer("mct", 4, 4, 73.7, 302.5, "MCT note: power-of-two activations",
                 settings={"data_generation": {"n_images": 256, "n_iter": 500}}))
    _write(runs / "peers" / "aimet__W4A4__s0.json", _peer("aimet", 4, 4, 73.54, 4.2, "AIMET note: per-tensor weights"))
    _write(runs / "peers" / "aimet__W3A3__s0.json", _peer("aimet", 3, 3, 47.73, 4.0, "AIMET note: per-tensor weights"))
    _write(runs / "cifar10_resnet20__squant__fixed__W4A4__default__s0.json", _zsq("squant", 4, 4, 75.12, 0.9))
    # not beside the peers: another protocol, another recipe
    _write(runs / "cifar10_resnet20__squant__ptq__W4A4__default__s0.json", _zsq("squant", 4, 4, 11.11, 0.9, "ptq"))
    _write(runs / "cifar10_resnet20__genie__fixed__W4A4__default__s0.json", _zsq("genie", 4, 4, 22.22, 0.9))

    text = "\n".join(peers_section(runs / "peers"))
    assert "## Peers side by side" in text
    assert "same run on the same machine" in text and "compare ratios" in text
    assert "| W4A4 | W3A3 |" in text
    assert "| mct (mct-pkg 9.9) | 0 | 73.70 (302.5 s) | — |" in text
    assert "| aimet (aimet-pkg 9.9) | 0 | 73.54 (4.2 s) | 47.73 (4.0 s) |" in text
    assert "| zsq squant | 0 | 75.12 (0.9 s) | — |" in text
    assert "11.11" not in text and "22.22" not in text
    assert "MCT note: power-of-two activations" in text and "AIMET note: per-tensor weights" in text
    # zsq rows come first, then the peers
    assert text.index("zsq squant") < text.index("| aimet (") < text.index("| mct (")
    # and render() includes the section
    assert "## Peers side by side" in render(runs)


def test_peers_section_empty_and_reduced_budget_label(tmp_path: Path):
    assert peers_section(tmp_path / "nope") == []
    d = tmp_path / "peers"
    _write(d / "mct__W4A8__s0__n500__g16x20.json",
           {**_peer("mct", 4, 8, 80.2, 5.5, "note"), "n_eval": 500,
            "settings": {"data_generation": {"n_images": 16, "n_iter": 20}}})
    text = "\n".join(peers_section(d))
    assert "top-1 on 500 eval images" in text
    assert "16 images x 20 iterations" in text


def test_peers_section_prefers_zsq_rows_of_the_same_run(tmp_path: Path):
    runs = tmp_path / "runs"
    _write(runs / "peers" / "aimet__W4A4__s0.json", _peer("aimet", 4, 4, 73.54, 4.2, "note"))
    _write(runs / "cifar10_resnet20__squant__fixed__W4A4__default__s0.json", _zsq("squant", 4, 4, 11.11, 0.9))
    _write(runs / "peers" / "zsq" / "cifar10_resnet20__squant__fixed__W4A4__default__s0.json",
           _zsq("squant", 4, 4, 75.12, 0.8))
    text = "\n".join(peers_section(runs / "peers"))
    assert "| zsq squant | 0 | 75.12 (0.8 s) |" in text and "11.11" not in text
    # and the peers' own zsq rows are not peer rows
    assert text.count("| zsq squant |") == 1


# --- bench/peers/run.py --mixed: MCT mixed precision beside zsq's `ptq` mixed rows (issue 38 item 5) ---

peers_mixed_section = load_bench_results("peers").peers_mixed_section


def _mct_mp(w: int, a: int, seed: int, top1: float, bits: list[int], zsq_bytes: int, mct_bytes: float) -> dict:
    names = ["conv1", *[f"layer{i}.{j}.conv{k}" for i in (1, 2, 3) for j in range(3) for k in (1, 2)], "linear"]
    mem = {"mct_weights_memory": mct_bytes, "zsq_q_bytes": zsq_bytes, "zsq_overhead_bytes": 8376}
    return {**_peer("mct-mp", w, a, top1, 300.0, "MCT note"), "seed": seed, "cpu_s_no_eval": 250.0,
            "load_avg": 3.0, "data_generation_cached": {"load_avg": 2.5},
            "settings": {"data_generation": {"n_images": 256, "n_iter": 500}},
            "mixed": {"matched_uniform_w": w, "candidates": [2, 3, 4, 6, 8], "target": mem, "achieved": mem,
                      "within_target": True, "bits": dict(zip(names, bits)), "searched_mean_w": float(w)}}


def _zsq_mixed(mode: str, w: int, a: int, seed: int, top1: float, recipe: str = "zeroq") -> dict:
    rec = _zsq(recipe, w, a, top1, 40.0, "ptq")
    rec["run"].update(seed=seed, mode=mode)
    rec["zsq"]["size"] = {"fp_bytes": 1078888, "q_bytes": 109672}
    if mode != "uniform":
        rec["zsq"]["mixed"] = {"wbits_avg": float(w)}
    return rec


def test_peers_mixed_section_rows_bits_and_differences(tmp_path: Path):
    runs = tmp_path / "runs"
    assert peers_mixed_section(runs / "peers" / "mixed", runs / "mixed") == []
    bits = [8, *([4] * 6), *([3] * 6), *([2] * 6), 8]
    _write(runs / "peers" / "mixed" / "mct-mp__W3A8__s0.json", _mct_mp(3, 8, 0, 61.25, bits, 109672, 101296.0))
    _write(runs / "peers" / "mixed" / "mct-mp__W3A8__s1.json", _mct_mp(3, 8, 1, 63.75, bits, 109672, 101296.0))
    _write(runs / "mixed" / "a.json", _zsq_mixed("uniform", 3, 8, 0, 72.90))
    _write(runs / "mixed" / "b.json", _zsq_mixed("kl", 3, 8, 0, 77.67))
    # not beside MCT: other bits, other protocol
    _write(runs / "mixed" / "c.json", _zsq_mixed("kl", 4, 8, 0, 11.11))
    other = _zsq_mixed("kl", 3, 8, 1, 22.22)
    other["run"]["protocol"] = "fixed"
    _write(runs / "mixed" / "d.json", other)

    text = "\n".join(peers_mixed_section(runs / "peers" / "mixed", runs / "mixed"))
    assert "## MCT mixed precision at the same weight memory" in text
    assert "weight memory of uniform W3 · A8 (issue 38: zsq `zeroq` --wbits-avg 3 --a 8 against MCT)" in text
    assert "| zsq zeroq uniform | 0 | 72.90 | 109,672 |" in text
    assert "| zsq zeroq --wbits-avg, kl sensitivity | 0 | 77.67 | 109,672 |" in text
    assert ("| mct-mp (mct-mp-pkg 9.9), candidates 2/3/4/6/8 | 0,1 | 62.50 ± 1.77 (n=2, min 61.25, max 63.75) | "
            "109,672 | 101,296 (101,296) | 3 | 300.0 | 250.0 | 2.5 / 3.0, 2.5 / 3.0 |") in text
    assert "seed 1: 8 4 4 4 4 4 4 3 3 3 3 3 3 2 2 2 2 2 2 8" in text
    assert "11.11" not in text and "22.22" not in text
    assert "8,376 bytes" in text and "Protocol differences" in text
    # uniform first, then the mixed zsq rows, then MCT
    assert text.index("zsq zeroq uniform") < text.index("kl sensitivity") < text.index("| mct-mp (")
    _write(runs / "cifar10_resnet20__squant__fixed__W4A4__default__s0.json", _zsq("squant", 4, 4, 75.12, 0.9))
    assert "## MCT mixed precision at the same weight memory" in render(runs)


def test_mct_peer_weight_memory_equals_zsq_model_size(resnet20):
    """mct_peer's conversion (MCT's kernel-only weights_memory, and zsq's count of the same layout) against
    zsq's own model_size of the `ptq` layout with those bits; runs in zsq's venv (no MCT needed)."""
    import random

    from zsq.api import model_size
    from zsq.quant.mixed import mixed_policy
    from zsq.quant.protocol import apply_protocol
    from zsq.spec import PROTOCOLS

    mct_peer = load_bench_script("peers/mct_peer")
    layers = mct_peer.kernel_layers(resnet20)
    assert len(layers) == 20 and layers[0]["module"] == "conv1" and layers[-1]["module"] == "linear"
    pinned = {"conv1", "linear"}
    uniform = mct_peer.weight_memory(layers, {L["fx"]: 8 if L["module"] in pinned else 3 for L in layers})
    assert uniform == {"mct_weights_memory": 101296.0, "zsq_q_bytes": 109672, "zsq_overhead_bytes": 8376}
    rng = random.Random(0)
    bits = {L["module"]: rng.choice([2, 3, 4, 6, 8]) for L in layers if L["module"] not in pinned}
    q = apply_protocol(resnet20, PROTOCOLS["ptq"], 3, 8, policy=mixed_policy(None, bits))
    got = mct_peer.weight_memory(layers, {L["fx"]: bits.get(L["module"], 8) for L in layers})
    assert got["zsq_q_bytes"] == model_size(resnet20, q)["q_bytes"]
    assert got["mct_weights_memory"] == sum(L["numel"] * bits.get(L["module"], 8) / 8 for L in layers)
