"""The benchmark harness: a real run through `python -m zsq quantize` becomes one JSON, a second
call resumes (skips it), and docs/results.md-style reports are generated from the JSON alone."""

from __future__ import annotations

import json

from zsq.bench.report import render
from zsq.bench.runner import Run, run_one
from zsq.bench.suites import SUITES


def test_run_one_writes_json_then_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    run = Run("cifar10_resnet20", "minmax-noise", "ptq", 8, 8, budget="smoke", eval_limit=200)
    rec = run_one(run, tmp_path, threads=1)
    f = tmp_path / f"{run.run_id}.json"
    assert f.is_file() and json.loads(f.read_text()) == json.loads(json.dumps(rec))
    z = rec["zsq"]
    assert z["protocol"] == "ptq" and z["bits"] == {"w": 8, "a": 8} and z["n_eval"] == 200
    assert 60.0 <= z["metrics"]["top1"] <= 100.0 and z["wall_s"] > 0 and z["peak_rss_mb"] > 0
    assert "OUT" in rec["command"] and "--eval-limit 200" in rec["command"]
    mtime = f.stat().st_mtime_ns
    again = run_one(run, tmp_path, threads=1)
    assert again["date"] == rec["date"] and f.stat().st_mtime_ns == mtime  # resumed: not re-run

    md = render(tmp_path)
    assert "## Targets" in md and "open (no runs)" in md
    assert f"| minmax-noise | {z['metrics']['top1']:.2f} |" in md  # summary table cell
    assert "| cifar10_resnet20 | minmax-noise | ptq | W8A8 | smoke | 0 |" in md  # every-run table


def test_suites_have_unique_run_ids():
    for name, suite in SUITES.items():
        ids = [r.run_id for r in suite()]
        assert len(ids) == len(set(ids)), name
