"""``tv:NAME`` / ``timm:NAME`` models with a user's ``--weights FILE`` through every flow (issue 36 item 2):
quantize, ``zsq.load`` / ``zsq eval OUT`` / ``zsq export OUT`` rebuild the architecture without the published
weights (offline, an empty torch cache: nothing to download), and the weights file is not needed again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import zsq
from zsq.models import load_model
from zsq.models.preprocess import Preprocess
from zsq.paths import sha256_file
from zsq.record import model_info

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
TEST_TAR = ASSETS / "cifar10-jpeg" / "test.tar"
PRE = Preprocess(resize=32, crop=32, input_size=32)  # small images: a fast run


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """8 JPEG-CIFAR-10 test images (4 airplanes, 4 cats) as an ImageFolder directory."""
    root = tmp_path_factory.mktemp("data") / "val"
    with tarfile.open(TEST_TAR) as tf:
        for cls in ("airplane", "cat"):
            (root / cls).mkdir(parents=True)
            for k in range(4):
                data = tf.extractfile(f"test/{cls}/{k:04d}.jpg").read()
                (root / cls / f"{k:04d}.jpg").write_bytes(data)
    return root


def offline_env(tmp_path: Path) -> dict:
    return {**os.environ, "ZSQ_HOME": str(ASSETS), "ZSQ_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"),
            "ZSQ_CACHE": str(tmp_path / "cache"), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def run_zsq(*args, env):
    return subprocess.run([sys.executable, "-m", "zsq", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def _weights_file(tmp_path: Path, make) -> Path:
    torch.manual_seed(0)
    f = tmp_path / "mine.pt"
    torch.save(make().state_dict(), f)
    return f


def _flows(spec: str, wfile: Path, data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("ZSQ_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no published weights to fall back on
    fp = load_model(spec, weights=str(wfile), preprocess=PRE)
    assert model_info(fp).weights_sha256 == sha256_file(wfile)
    q = zsq.quantize(fp, "squant", 4, 8, progress=False, device="cpu")
    metrics = zsq.evaluate(q, data, progress=False)
    out = zsq.save(q, tmp_path / "out", metrics=metrics, eval_path=str(data))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    wfile.rename(tmp_path / "moved.pt")  # the weights file is not read again
    back = zsq.load(out)
    assert model_info(back).weights_sha256 == model_info(q).weights_sha256 == sha256_file(tmp_path / "moved.pt")
    with torch.inference_mode():
        assert torch.equal(back(x), q(x))
    return out, metrics


def test_torchvision_model_with_user_weights_every_flow(tiny_folder, tmp_path, monkeypatch):
    import torchvision

    wfile = _weights_file(tmp_path, torchvision.models.mobilenet_v3_small)
    out, metrics = _flows("tv:mobilenet_v3_small", wfile, tiny_folder, tmp_path, monkeypatch)
    data_dir = tiny_folder
    # the user's weights, not torchvision's (there are none here) nor a fresh initialisation
    ref = torchvision.models.mobilenet_v3_small()
    ref.load_state_dict(torch.load(tmp_path / "moved.pt", weights_only=True))
    ref.eval()
    again = load_model("tv:mobilenet_v3_small", weights=str(tmp_path / "moved.pt"), preprocess=PRE)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(again(x), ref(x))

    # the CLI in a fresh process, offline with an empty torch cache: `zsq export OUT --eval-data` rebuilds
    # OUT (zsq.load), evaluates it and its ONNX export
    r = run_zsq("export", out, "--eval-data", data_dir, "-q", env=offline_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.onnx").is_file()
    assert f"top1 pytorch {metrics['top1']:.2f}" in r.stdout, r.stdout
    assert json.loads((out / "zsq.json").read_text())["model"]["id"] == "tv:mobilenet_v3_small"


def test_timm_model_with_user_weights_every_flow(tiny_folder, tmp_path, monkeypatch):
    timm = pytest.importorskip("timm", reason="timm models need the timm extra: pip install 'zsq[timm]'")
    wfile = _weights_file(tmp_path, lambda: timm.create_model("resnet10t", pretrained=False))
    _flows("timm:resnet10t", wfile, tiny_folder, tmp_path, monkeypatch)


def test_missing_user_weights_file_is_clear(tmp_path):
    from zsq.errors import WeightsError

    for spec in ("tv:mobilenet_v3_small", "cifar10_resnet20"):
        with pytest.raises(WeightsError, match="nope.pt does not exist"):
            load_model(spec, weights=str(tmp_path / "nope.pt"))
