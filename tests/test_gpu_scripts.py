"""bench/gpu_check.sh and bench/gpu_paper.sh (issue 36 item 5) in their ``--cpu-smoke`` mode: the code path
the GPU machine runs (steps, step JSONs, resume across calls and machines, the summary and the state
parts), on the CPU at a far-below-smoke budget, so the scripts never rot while no GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ASSETS, load_bench_results

REPO = Path(__file__).resolve().parents[1]


def _script(name: str, tmp: Path, *args: str, state: str = "state", out: str = "out") -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CI": "true"}
    env.pop("OUT", None)
    r = subprocess.run(["bash", str(REPO / "bench" / f"gpu_{name}.sh"), "--cpu-smoke", "--assets", str(ASSETS),
                        "--state", str(tmp / state), "--out", str(tmp / out), *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((tmp / out / f"gpu_{name}.json").read_text())


def test_gpu_check_cpu_smoke(tmp_path):
    s = _script("check", tmp_path)
    assert s["mode"] == "cpu-smoke" and s["script"] == "check" and s["pending"] == []
    steps = {r["step"]: r for r in s["steps"]}
    assert {r["status"] for r in steps.values()} == {"done"}, steps
    assert steps["tests"]["counts"].get("passed", 0) >= 1 and not steps["tests"]["failed"]
    smoke = steps["smoke-genie"]
    assert smoke["result"]["metrics"]["top1"] > 10 and smoke["result"]["machine"]["device"] == "cpu"
    t = steps["time-cifar10_resnet20-cpu"]
    assert t["synth"]["iters"] == [1, 2] and len(t["recon"]["wall_s"]) == 2 and t["device"]["device"] == "cpu"
    assert s["machine"]["device"] == "cpu" and "loadavg" in s["machine"]
    _renders(tmp_path, s, "smoke-genie")


def _renders(tmp: Path, summary: dict, step: str) -> None:
    """bench/results/gpu.py renders the summary (relabelled as a GPU run: smoke runs are never rendered)."""
    d = tmp / "runs-gpu"
    d.mkdir(exist_ok=True)
    (d / f"gpu_{summary['script']}.json").write_text(json.dumps({**summary, "mode": "gpu"}))
    text = "\n".join(load_bench_results("gpu").gpu_section(d))
    assert f"| {step} | done |" in text and "No GPU run yet" not in text
    assert "No GPU run yet" in "\n".join(load_bench_results("gpu").gpu_section(tmp / "nothing"))


def test_gpu_paper_cpu_smoke_resumes_on_another_machine(tmp_path):
    """One step per call, then the state parts unpacked into a fresh state directory (a bare machine): the
    finished step is not run again, the others finish."""
    first = _script("paper", tmp_path, "--max-steps", "1")
    assert [r["step"] for r in first["steps"]] == ["r20-genie-w4a4"] and first["stopped"] == "--max-steps 1"
    assert first["pending"] == ["r20-genie-w3a3", "r20-real1024-w4a4"]
    parts = first["state"]["parts"]
    assert parts and all((tmp_path / "out" / p).stat().st_size <= 15 * 2**20 for p in parts)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), "restore", str(tmp_path / "out"),
                        "--state", str(tmp_path / "fresh")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    second = _script("paper", tmp_path, state="fresh", out="out2")
    steps = {r["step"]: r for r in second["steps"]}
    assert second["pending"] == [] and {r["status"] for r in steps.values()} == {"done"}
    assert steps["r20-genie-w4a4"]["calls"] == 1  # kept, not run again
    assert steps["r20-genie-w4a4"]["result"] == first["steps"][0]["result"]
    real = steps["r20-real1024-w4a4"]["result"]
    assert real["synthetic"]["kind"] == "real" and real["synthetic"]["n_images"] == 16
    assert steps["r20-genie-w3a3"]["result"]["bits"] == {"w": 3, "a": 3}
    assert steps["r20-genie-w3a3"]["result"]["synthetic"]["sha256"] == first["steps"][0]["result"]["synthetic"]["sha256"]
    _renders(tmp_path, second, "r20-real1024-w4a4")
