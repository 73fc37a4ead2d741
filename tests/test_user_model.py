"""A person's own model through the CLI (issue 33): real torchvision architectures from a
``file.py:factory``, the input size known or refused before any work, and the CLI's vocabulary,
help texts and result lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zsq.errors import BadValueError
from zsq.models import load_model
from zsq.models.preprocess import parse_input_size
from zsq.models.zoo import model_input_size, tv_preprocess
from zsq.record import model_info

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
TEST_TAR = ASSETS / "cifar10-jpeg" / "test.tar"

USER_MODELS = """
import torch
import torchvision


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def mobilenet():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=10)


def declared():
    m = torchvision.models.resnet18(num_classes=10)
    m.input_size = (3, 48, 48)
    return m
"""


@pytest.fixture(scope="module")
def user_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("user")
    f = d / "mymodel.py"
    f.write_text(USER_MODELS)
    return f


def run_zsq(*args, env_extra=None, timeout=900):
    env = {**os.environ, "ZSQ_HOME": str(ASSETS), "OMP_WAIT_POLICY": "PASSIVE"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "zsq", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_line_error(r, *needles):
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# -- the input size --------------------------------------------------------------------------------

def test_parse_input_size():
    assert parse_input_size("3,64,64") == 64
    assert parse_input_size("224") == 224
    assert parse_input_size((3, 299, 299)) == 299
    for bad in ("3,64", "a,b,c", "1,64,64", "3,64,48", "0", "3,64,64,64"):
        with pytest.raises(BadValueError):
            parse_input_size(bad)


def test_size_unknown_is_refused_before_any_work(user_file, tmp_path):
    out = tmp_path / "out"
    r = run_zsq("quantize", f"{user_file}:resnet18", "--recipe", "squant", "--w", "4", "--a", "8", "-o", out,
                env_extra={"ZSQ_CACHE": str(tmp_path / "cache")})
    one_line_error(r, "--input-size")
    assert not out.exists()
    assert not (tmp_path / "cache" / "synthetic").exists()
    r = run_zsq("quantize", f"{user_file}:resnet18", "--recipe", "squant", "--input-size", "3,64,48", "-o", out)
    one_line_error(r, "square")


def test_size_from_the_model_or_the_flags(user_file):
    assert model_info(load_model(f"{user_file}:declared")).preprocess.input_size == 48
    assert model_info(load_model(f"{user_file}:resnet18", input_size="3,40,40")).preprocess.input_size == 40
    with pytest.raises(BadValueError, match="--input-size"):
        load_model(f"{user_file}:resnet18")
    m = load_model(f"{user_file}:mobilenet", input_size=64)
    assert model_input_size(m) is None and model_info(m).preprocess.input_size == 64


def test_torchvision_sizes_come_from_the_published_transforms():
    inc = tv_preprocess("inception_v3")
    assert (inc.input_size, inc.crop, inc.resize) == (299, 299, 342)
    eff = tv_preprocess("efficientnet_b3")
    assert (eff.input_size, eff.interpolation) == (300, "bicubic")
    assert tv_preprocess("resnet18").input_size == 224


def test_no_training_mode_forward_on_a_batch_of_one(user_file):
    """BN statistics with batch statistics (SQuant's BN-consistent noise pass) on a network whose last
    feature map is 1x1: a trace on one image was 'Expected more than 1 value per channel when training'."""
    from zsq.ptq.bn_ranges import collect_stats

    m = load_model(f"{user_file}:resnet18", input_size=32)  # 32 px: the last feature map is 1x1
    stats = collect_stats(m, n=4)
    assert stats.modules


# -- every quantizer kind on real torchvision architectures (smoke budget, small input) ------------

KINDS = [  # (recipe, what kind of quantizer it exercises)
    ("squant", "synthesis-free"),
    ("zeroq", "range calibration on synthetic images"),
    ("genie", "block reconstruction"),
    ("qat-zeroq", "QAT (distillation fine-tuning)"),
    ("gdfq", "generator game"),
]


# every kind on MobileNetV3-small (1.5 M parameters); ResNet-18 (11 M, the crash: a 1x1 last
# feature map) under the synthesis-free kind only, to keep CI short
CASES = [("mobilenet", k[0]) for k in KINDS] + [("resnet18", "squant")]


@pytest.mark.slow
@pytest.mark.parametrize("factory,recipe", CASES)
def test_user_torchvision_model_every_quantizer_kind(user_file, tmp_path, factory, recipe):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    r = run_zsq("quantize", f"{user_file}:{factory}", "--recipe", recipe, "--w", "4", "--a", "8", "--budget", "smoke",
                "--input-size", "3,32,32", "--threads", "1", "-q", "-o", out, env_extra={"ZSQ_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "zsq.json").read_text())
    assert doc["bits"] == {"w": 4, "a": 8}
    q = torch.load(out / "qmodel.pt", map_location="cpu", weights_only=True)
    assert q["int_weights"], "no quantized weight"
    for name, codes in q["int_weights"].items():
        per_channel = codes.reshape(codes.shape[0], -1)
        assert max(len(torch.unique(row)) for row in per_channel) <= 2 ** 8  # first / last layers may be 8-bit
    if doc["synthetic"]["n_images"]:
        # synthesizers make images of the model's input size
        meta = json.loads((Path(doc["synthetic"]["dir"]) / "meta.json").read_text())
        assert meta["image_shape"] == [3, 32, 32]


# -- the CLI as people meet it ---------------------------------------------------------------------

def test_eval_of_a_missing_result_directory(tmp_path):
    r = run_zsq("eval", tmp_path / "nonexistent", "--eval-data", TEST_TAR)
    one_line_error(r, "no such result directory")
    r = run_zsq("eval", "out/nonexistent", "--eval-data", TEST_TAR)
    one_line_error(r, "no such result directory")


def test_torchvision_download_failure_is_one_line(tmp_path):
    """No weights, not offline, and the download fails (a proxy on a closed port: a real URLError, no
    network used): one line naming --weights instead of a URLError traceback."""
    env = {"ZSQ_OFFLINE": "0", "CI": "", "TORCH_HOME": str(tmp_path / "torch"), "ZSQ_CACHE": str(tmp_path / "c"),
           "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    r = run_zsq("quantize", "tv:resnet18", "--recipe", "squant", "-o", tmp_path / "out", env_extra=env, timeout=300)
    one_line_error(r, "--weights")
    assert not (tmp_path / "out").exists()


def test_every_option_has_help_text():
    import typer

    from zsq.cli import app

    cmd = typer.main.get_command(app)

    def walk(c, path):
        subs = getattr(c, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, path + [name])
        else:
            yield path, c

    missing = []
    for path, c in walk(cmd, []):
        for p in c.params:
            if getattr(p, "hidden", False) or p.param_type_name != "option" or p.name == "help":
                continue
            if not (p.help or "").strip():
                missing.append(f"zsq {' '.join(path)} {p.opts[0]}")
    assert not missing, missing


def test_protocol_help_lists_every_protocol():
    from zsq.cli import PROTOCOL_NAMES
    from zsq.spec import PROTOCOLS

    assert set(PROTOCOL_NAMES.split(" | ")) == set(PROTOCOLS._items)


def test_results_on_stdout_with_their_subset(tmp_path):
    r = run_zsq("eval", "cifar10_resnet20", "--eval-data", TEST_TAR, "--eval-limit", "200", "-q", "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("top1 ") and len(lines[0].split()) == 2  # the line scripts read, unchanged
    assert lines[1].startswith("top5 ") and "n=200" in lines[1] and "--eval-limit" in lines[1]
    # the old spellings still work and give the same numbers
    r2 = run_zsq("eval", "cifar10_resnet20", "--data", TEST_TAR, "--limit", "200", "-q", "--threads", "1")
    assert r2.returncode == 0 and r2.stdout == r.stdout
    r3 = run_zsq("eval", "cifar10_resnet20", "--eval-data", TEST_TAR, "--data", str(tmp_path), "--threads", "1")
    one_line_error(r3, "--data", "--eval-data")
