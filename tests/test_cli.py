"""The real command line, run as a subprocess (``python -m zsq``): every error a user can cause
exits 2 with one line on stderr and writes nothing; the success paths write what the contract says.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
TEST_TAR = ASSETS / "cifar10-jpeg" / "test.tar"
RESNET32 = ASSETS / "cifar10-resnet" / "resnet32.th"

def run_zsq(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m zsq ARGS`` with the test session's ZSQ_HOME / ZSQ_CACHE, offline (CI=true)."""
    e = {**os.environ, "CI": "true", "COLUMNS": "80", **(env or {})}
    return subprocess.run([sys.executable, "-m", "zsq", *map(str, args)], capture_output=True, text=True, env=e,
                          timeout=timeout, cwd=REPO)


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one non-empty stderr line starting with 'error:' holding ``needles``."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{r.stderr}"
    line = lines[0]
    assert line.startswith("error:"), line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def tree(d: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``d`` (hidden files included)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


# -------------------------------------------------------------------------------------------------
# bad inputs: one test each

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    import random

    rnd = random.Random(0)
    (d / "corrupt.th").write_bytes(bytes(rnd.randrange(256) for _ in range(4096)))
    home = d / "home"  # a ZSQ_HOME whose resnet32.th is not the published file
    (home / "cifar10-resnet").mkdir(parents=True)
    (home / "cifar10-resnet" / "resnet32.th").write_bytes(bytes(rnd.randrange(256) for _ in range(4096)))
    loose = d / "loose"  # images and other files, but no class folders
    loose.mkdir()
    shutil.copy(REPO / "README.md", loose / "notes.txt")
    (loose / "img0.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    (loose / "img1.png").write_bytes(b"\x89PNG" + bytes(100))
    return {"tmp": d, "corrupt": d / "corrupt.th", "home": home, "loose": loose, "test": TEST_TAR,
            "r32": RESNET32}


Q = ["quantize", "cifar10_resnet20", "--recipe", "minmax-noise", "--budget", "smoke", "-q"]

# id: (args after "zsq", needles in the error line, extra env)
BAD = {
    "unknown-model": (["quantize", "cifar10_resnet2", "--recipe", "minmax-noise", "--budget", "smoke"],
                      ["unknown model 'cifar10_resnet2'", "did you mean", "cifar10_resnet20"], {}),
    "unknown-recipe": (["quantize", "cifar10_resnet20", "--recipe", "minmax-nosie", "--budget", "smoke"],
                       ["unknown recipe 'minmax-nosie'", "did you mean", "minmax-noise"], {}),
    "w-9": (Q + ["--w", "9"], ["--w", "2..8 or 16", "9"], {}),
    "a-1": (Q + ["--a", "1"], ["--a", "2..8 or 16", "1"], {}),
    "w-12": (Q + ["--w", "12"], ["--w", "2..8 or 16", "12"], {}),
    "weights-missing": (Q + ["--weights", "{tmp}/nope.th"], ["nope.th", "does not exist"], {}),
    "weights-corrupt": (Q + ["--weights", "{corrupt}"], ["corrupt.th", "cannot read weights"], {}),
    "checksum-mismatch": (["quantize", "cifar10_resnet32", "--recipe", "minmax-noise", "--budget", "smoke"],
                          ["resnet32.th", "SHA-256"], {"ZSQ_HOME": "{home}"}),
    "weights-other-arch": (Q + ["--weights", "{r32}"], ["resnet32.th", "does not fit this architecture"], {}),
    "eval-missing": (Q + ["--eval", "{tmp}/nope.tar"], ["nope.tar", "does not exist"], {}),
    "eval-not-imagefolder": (Q + ["--eval", "{loose}"], ["loose", "ImageFolder"], {}),
    "unknown-protocol": (Q + ["--protocol", "ptqq"], ["unknown protocol 'ptqq'", "ptq"], {}),
    "unknown-budget": (["quantize", "cifar10_resnet20", "--recipe", "minmax-noise", "--budget", "smok"],
                       ["unknown budget 'smok'", "smoke"], {}),
    "bad-layer-bits": (Q + ["--layer-bits", "layer1.0.conv1=4bit"], ["--layer-bits", "NAME=WxAy", "4bit"], {}),
    "keep-fp-no-match": (Q + ["--keep-fp", "layer9.*"], ["match no layer", "layer9.*"], {}),
    "threads-0": (Q + ["--threads", "0"], ["--threads", ">= 1"], {}),
    "set-unknown-hparam": (Q + ["--set", "w_obsrver=mse"], ["unknown hparam", "w_obsrver", "did you mean", "w_observer"],
                           {}),
    "set-not-key-value": (Q + ["--set", "w_observer"], ["--set", "KEY=VALUE", "w_observer"], {}),
    "set-bad-calib-batch": (Q + ["--set", "calib_batch=many"], ["setting calib_batch expects an integer", "many"], {}),
    "set-bad-int": (["quantize", "cifar10_resnet20", "--recipe", "genie", "--budget", "smoke", "-q", "--set",
                     "iters=many"], ["setting iters expects an integer", "many"], {}),
    "set-bad-augment": (["quantize", "cifar10_resnet20", "--recipe", "genie", "--budget", "smoke", "-q", "--calib",
                         "{test}", "--calib-n", "16", "--set", "augment=rotate"],
                        ["augment must be one of", "flipshift", "rotate"], {}),
    "synth-set-unknown": (["quantize", "cifar10_resnet20", "--recipe", "zeroq", "--budget", "smoke", "-q",
                           "--synth-set", "itres=5"], ["ZeroQConfig has no setting 'itres'", "did you mean", "iters"], {}),
    "synth-set-bad-type": (["quantize", "cifar10_resnet20", "--recipe", "zeroq", "--budget", "smoke", "-q",
                            "--synth-set", "iters=many"], ["iters", "expects an integer", "many"], {}),
    "synth-set-no-synth": (["quantize", "cifar10_resnet20", "--recipe", "squant", "--budget", "smoke", "-q",
                            "--synth-set", "iters=5"], ["--synth-set", "squant", "no synthesizer"], {}),
    "synth-set-with-calib": (Q + ["--synth-set", "iters=5", "--calib", "{test}"], ["--synth-set", "--calib"], {}),
    "export-not-an-output": (["export", "{loose}"], ["loose", "not a finished zsq output"], {}),
    "export-bad-format": (["export", "{loose}", "--format", "tflite"], ["--format", "onnx", "tflite"], {}),
    "eval-not-an-output": (["eval", "{loose}", "--data", "{test}"], ["loose", "not a finished zsq output"], {}),
}


@pytest.fixture(scope="module")
def bad_runs(bad_files, tmp_path_factory):
    """Every BAD case run once, two at a time (each run is mostly `import torch`, one core each)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("bad_runs")

    def one(case):
        if case == "weights-other-arch" and not RESNET32.is_file():
            return None, None
        args, _, env = BAD[case]
        args = [a.format(**bad_files) for a in args]
        env = {k: v.format(**bad_files) for k, v in env.items()}
        out = root / case / "out"
        out.parent.mkdir()
        if args[0] == "quantize":
            args += ["-o", out]
        return run_zsq(*args, env=env), out

    with ThreadPoolExecutor(max_workers=2) as ex:
        return dict(zip(BAD, ex.map(one, BAD)))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_one_line_nothing_written(case, bad_runs):
    r, out = bad_runs[case]
    if r is None:
        pytest.skip(f"shared asset {RESNET32} not present")
    assert_user_error(r, *BAD[case][1])
    assert not out.exists(), f"a failed run wrote {sorted(os.listdir(out))}"


def test_usage_error_exits_2_without_traceback(tmp_path):
    r = run_zsq("quantize", "cifar10_resnet20", "--recipe", "minmax-noise", "--w", "four", "-o", tmp_path / "o")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "--w" in r.stderr
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------------
# success paths

def test_eval_prints_top1():
    r = run_zsq("eval", "cifar10_resnet20", "--data", TEST_TAR, "--limit", "1000", "-q")
    assert r.returncode == 0, r.stderr
    m = re.search(r"^top1 (\d{1,3}\.\d{2})$", r.stdout, re.M)
    assert m, r.stdout
    assert 78.0 <= float(m.group(1)) <= 83.0  # FP ResNet-20: 80.40 on the 1,000-image subset
    assert re.search(r"^top5 \d{1,3}\.\d{2}  \(n=1000, a subset: --eval-limit 1000\)$", r.stdout, re.M), r.stdout


@pytest.fixture(scope="module")
def quantized_out(tmp_path_factory):
    """One real CLI run: minmax-noise (Gaussian noise + min-max), smoke budget, W8A8, evaluated."""
    out = tmp_path_factory.mktemp("cli_quantize") / "r20-w8a8"
    r = run_zsq("quantize", "cifar10_resnet20", "--recipe", "minmax-noise", "--budget", "smoke", "--w", "8",
                "--a", "8", "--eval", TEST_TAR, "--eval-limit", "1000", "-q", "-o", out, "--set", "calib_batch=32")
    assert r.returncode == 0, r.stderr
    return out, r


def _two_decimals(x) -> bool:
    return isinstance(x, (int, float)) and round(x, 2) == x


def test_quantize_writes_contract(quantized_out):
    from zsq.models import ZOO

    out, r = quantized_out
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["qmodel.pt", "zsq.json"]
    assert not list(out.glob(".*.tmp")), "atomic-write leftovers"
    doc = json.loads((out / "zsq.json").read_text())
    for key in ("schema_version", "model", "recipe", "protocol", "bits", "budget", "seed", "synthetic", "versions",
                "machine", "wall_s", "peak_rss_mb", "size", "metrics", "n_eval", "eval_path"):
        assert key in doc, key
    assert doc["schema_version"] == 1
    assert doc["model"] == {"id": "cifar10_resnet20", "weights_sha256": ZOO["cifar10_resnet20"].sha256}
    assert set(doc["recipe"]) >= {"name", "pre", "synth", "quant", "hparams"}
    assert doc["recipe"]["name"] == "minmax-noise" and doc["recipe"]["synth"] == "gaussian"
    assert doc["recipe"]["quant"] == "calib" and doc["recipe"]["pre"] is None
    assert doc["recipe"]["hparams"] == {"w_observer": "minmax", "a_observer": "minmax", "calib_batch": 32}  # --set
    assert doc["protocol"] == "fixed"  # the recipe's native protocol
    assert doc["bits"] == {"w": 8, "a": 8}
    assert doc["budget"] == "smoke" and doc["seed"] == 0
    syn = doc["synthetic"]
    assert set(syn) >= {"dir", "sha256", "n_images"}
    assert syn["n_images"] == 64 and re.fullmatch(r"[0-9a-f]{64}", syn["sha256"]) and Path(syn["dir"]).is_dir()
    v = doc["versions"]
    assert set(v) >= {"zsq", "git", "torch", "torchvision", "onnx", "onnxruntime", "python"}
    assert v["torch"] == torch.__version__ and v["python"] == platform.python_version()
    import zsq

    assert v["zsq"] == zsq.__version__
    assert set(doc["machine"]) >= {"cpu", "threads"} and doc["machine"]["threads"] >= 1 and doc["machine"]["cpu"]
    assert doc["wall_s"] > 0 and doc["peak_rss_mb"] > 0
    assert 0 < doc["size"]["q_bytes"] < doc["size"]["fp_bytes"]
    assert set(doc["metrics"]) == {"top1", "top5"}
    assert all(_two_decimals(doc["metrics"][k]) for k in ("top1", "top5")), doc["metrics"]
    assert 75.0 <= doc["metrics"]["top1"] <= doc["metrics"]["top5"] <= 100.0  # W8A8 stays close to FP 80.40
    assert doc["n_eval"] == 1000 and doc["eval_path"] == str(TEST_TAR)
    # the printed line is the recorded metric
    assert re.search(rf"^top1 {doc['metrics']['top1']:.2f}$", r.stdout, re.M), r.stdout
    # qmodel.pt is a plain-tensor payload
    payload = torch.load(out / "qmodel.pt", map_location="cpu", weights_only=True)
    assert payload["format"] == "zsq-qmodel-1" and payload["int_weights"]


def test_output_dir_with_result_refused_then_overwritten(quantized_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(quantized_out[0], out)
    before = tree(out)
    args = ["quantize", "cifar10_resnet20", "--recipe", "minmax-noise", "--budget", "smoke", "--w", "4", "--a", "8",
            "-q", "-o", out]
    r = run_zsq(*args)
    assert_user_error(r, str(out), "already holds a result", "--overwrite")
    assert tree(out) == before, "the refused run touched the first result"

    r = run_zsq(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "zsq.json").read_text())
    assert doc["bits"] == {"w": 4, "a": 8} and doc["metrics"] is None
    assert tree(out)["qmodel.pt"] != before["qmodel.pt"]


def test_bad_input_with_overwrite_keeps_the_old_result(quantized_out, tmp_path):
    """--overwrite retires the old zsq.json only once every input has been checked."""
    out = tmp_path / "out"
    shutil.copytree(quantized_out[0], out)
    before = tree(out)
    r = run_zsq("quantize", "cifar10_resnet20", "--recipe", "minmax-noise", "--budget", "smoke", "--keep-fp",
                "layer9.*", "--overwrite", "-q", "-o", out)
    assert_user_error(r, "match no layer")
    assert tree(out) == before


def test_methods_and_zoo_list_names():
    r = run_zsq("methods")
    assert r.returncode == 0, r.stderr
    for name in ("minmax-noise", "zeroq"):
        assert name in r.stdout
    r = run_zsq("zoo")
    assert r.returncode == 0, r.stderr
    for name in ("cifar10_resnet20", "cifar10_resnet32", "cifar10_resnet44", "cifar10_resnet56"):
        assert name in r.stdout


def test_python_m_zsq_help():
    r = run_zsq("--help")
    assert r.returncode == 0, r.stderr
    for verb in ("quantize", "eval", "zoo", "methods"):
        assert verb in r.stdout


# -------------------------------------------------------------------------------------------------
# interruption: a run killed mid-synthesis leaves no zsq.json (not even the old one it replaces)

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_quantize_leaves_no_zsq_json(sig, quantized_out, tmp_path):
    import zsq
    from zsq.errors import DataError

    out = tmp_path / "out"
    shutil.copytree(quantized_out[0], out)  # an old result that --overwrite is replacing
    cache = tmp_path / "cache"  # fresh: the zeroq set is made, not reused
    synth_root = cache / "synthetic"
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "CI": "true", "ZSQ_CACHE": str(cache)}
    # the default budget takes minutes: the run is certainly still synthesizing when it is killed. fp32: a
    # signal is handled between torch ops, and on a CPU without native bf16 one bf16 iteration of the
    # 256-image batch takes over a minute (measured), so the process could not answer within the wait
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "zsq", "quantize", "cifar10_resnet20", "--recipe", "zeroq",
                              "--budget", "default", "--w", "4", "--a", "8", "--synth-set", "precision=fp32",
                              "--overwrite", "-q", "-o", str(out)],
                             stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while not (synth_root.is_dir() and any(synth_root.glob("zeroq-*"))):  # synthesis has started
                assert p.poll() is None, f"exited early ({p.returncode}): {log.read_text()}"
                assert time.monotonic() < deadline, "synthesis did not start within 120 s"
                time.sleep(0.05)
            time.sleep(0.3)
            assert p.poll() is None
            p.send_signal(sig)
            rc = p.wait(timeout=180)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    if sig == signal.SIGINT:
        # 130 from sys.exit; once in a while (CI, not reproduced) the process still reports death by SIGINT
        # (-2) after printing the message: both are what a shell shows as 130 (128 + SIGINT)
        assert rc in (130, -signal.SIGINT), log.read_text()
        assert "Traceback" not in log.read_text()
        assert "interrupted" in log.read_text()
    else:
        assert rc == -signal.SIGKILL
    assert not (out / "zsq.json").exists()
    assert not list(out.glob(".zsq.json.*")), "a half-written zsq.json is left"
    with pytest.raises(DataError, match="not a finished zsq output"):
        zsq.load(out)


def test_export_writes_model_onnx_and_checks_it(quantized_out, tmp_path):
    """`zsq export OUT --check DATA` writes OUT/model.onnx and prints PyTorch and ONNX Runtime top-1;
    `zsq eval OUT/model.onnx` runs the exported file."""
    src, _ = quantized_out
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    r = run_zsq("export", out, "--check", TEST_TAR, "--check-limit", "500", "-q")
    assert r.returncode == 0, r.stderr
    assert (out / "model.onnx").is_file() and not list(out.glob(".*.tmp"))
    m = re.search(r"^top1 pytorch (\d+\.\d\d)  onnxruntime (\d+\.\d\d)  \(n=500\)$", r.stdout, re.M)
    assert m, r.stdout
    assert abs(float(m.group(1)) - float(m.group(2))) <= 1.0  # W8A8, 500 images: at most a few flips
    r2 = run_zsq("eval", out / "model.onnx", "--data", TEST_TAR, "--limit", "500", "-q")
    assert r2.returncode == 0, r2.stderr
    assert re.search(rf"^top1 {m.group(2)}$", r2.stdout, re.M), r2.stdout


def test_bench_list_names_every_suite():
    from zsq.bench.suites import SUITES

    r = run_zsq("bench", "list")
    assert r.returncode == 0, r.stderr
    for name in SUITES:
        assert re.search(rf"^{name}: \S", r.stdout, re.M), r.stdout
