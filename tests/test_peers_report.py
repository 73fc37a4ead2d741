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
