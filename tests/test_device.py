"""Issue 36: ``--device`` / ``device=`` and the one device rule (every tensor is made on the device of the
model or the data it belongs to). On a machine without CUDA the ``cuda`` cases skip with their reason; the
CPU cases pin that the device plumbing changed no bit of a CPU run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zsq
from zsq import hardware
from zsq.errors import BadValueError

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device on this machine"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]


# -- the resolver -------------------------------------------------------------------------------------
def _fake_cuda(monkeypatch, count: int = 2, bf16: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "device", lambda d: __import__("contextlib").nullcontext())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert hardware.resolve_device() == torch.device("cpu")
    assert hardware.resolve_device("auto") == hardware.resolve_device(None) == torch.device("cpu")
    assert hardware.resolve_device("CPU") == hardware.resolve_device(torch.device("cpu")) == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(BadValueError, match="CUDA is not available"):
            hardware.resolve_device(spec)


def test_resolve_device_names_and_ranks(monkeypatch):
    _fake_cuda(monkeypatch, count=2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert hardware.resolve_device("auto") == torch.device("cuda")
    assert hardware.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert hardware.resolve_device("auto") == torch.device("cuda", 1)  # torchrun: this rank's GPU
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(BadValueError, match="2 CUDA device"):
        hardware.resolve_device("auto")
    with pytest.raises(BadValueError, match="2 CUDA device"):
        hardware.resolve_device("cuda:2")
    for bad in ("gpu", "cuda:x", "cuda:", "mps", ""):
        with pytest.raises(BadValueError, match="auto, cpu, cuda or cuda:N"):
            hardware.resolve_device(bad)


def test_precision_auto_per_device(monkeypatch):
    monkeypatch.delenv("ZSQ_PRECISION", raising=False)
    cpu = hardware.resolve_precision("auto")
    assert cpu == ("bf16" if hardware.native_bf16() else "fp32")
    _fake_cuda(monkeypatch, bf16=True)
    assert hardware.resolve_precision("auto", "cuda") == "bf16"
    assert hardware.resolve_precision("auto") == cpu  # no device given: the CPU, as before
    with hardware.on_device("cuda"):
        assert hardware.resolve_precision("auto") == "bf16"
        from zsq.synth.base import get_synthesizer

        assert get_synthesizer("zeroq", "smoke").config.precision == "bf16"
    assert hardware.resolve_precision("auto") == cpu
    _fake_cuda(monkeypatch, bf16=False)
    assert hardware.resolve_precision("auto", "cuda:0") == "fp16"  # autocast fp16 + GradScaler (hardware.Amp)
    with hardware.on_device("cuda"):
        from zsq.synth.base import get_synthesizer

        assert get_synthesizer("genie", "smoke").config.precision == "fp16"
    assert hardware.resolve_precision("fp32", "cuda") == "fp32"
    monkeypatch.setenv("ZSQ_PRECISION", "fp32")
    _fake_cuda(monkeypatch, bf16=True)
    assert hardware.resolve_precision("auto", "cuda") == "fp32"  # the environment pins it on every device


def test_amp_choice_per_device(monkeypatch):
    """The one precision rule of the training loops: bf16 stays bf16 on the CPU and on a CUDA device with bf16,
    and becomes fp16 (with a gradient scaler) on a CUDA device without it; no scaler otherwise."""
    for p in ("fp32", "bf16", "fp16"):
        assert hardware.Amp.choose(p, "cpu") == p
    assert hardware.Amp("bf16", "cpu").scaler is None and hardware.Amp("fp32", "cpu").scaler is None
    assert hardware.Amp("fp32", "cpu").dtype is None and hardware.Amp("bf16", "cpu").dtype == torch.bfloat16
    with pytest.raises(BadValueError, match="fp32, bf16 or fp16"):
        hardware.Amp.choose("auto", "cpu")
    _fake_cuda(monkeypatch, bf16=True)
    assert hardware.Amp.choose("bf16", "cuda:0") == "bf16" and hardware.Amp.choose("fp32", "cuda") == "fp32"
    _fake_cuda(monkeypatch, bf16=False)
    assert hardware.Amp.choose("bf16", "cuda:0") == "fp16" and hardware.Amp.choose("fp32", "cuda") == "fp32"
    assert hardware.Amp.choose("bf16", "cpu") == "bf16"  # the CPU never asks the GPU


def _train(amp, steps: int = 4):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt_a = torch.optim.Adam(m[0].parameters(), lr=0.01)
    opt_b = torch.optim.SGD(m[2].parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    losses = []
    for _ in range(steps):
        opt_a.zero_grad(set_to_none=True)
        opt_b.zero_grad(set_to_none=True)
        if amp is None:
            loss = (m(x) - y).pow(2).mean()
            loss.backward()
            opt_a.step()
            opt_b.step()
        else:
            with amp.autocast():
                out = m(x)
            loss = (out.float() - y).pow(2).mean()
            amp.backward(loss)
            amp.step(opt_a, opt_b)
        losses.append(float(loss.detach()))
    return m, losses


def test_amp_fp32_is_the_plain_loop_and_fp16_scales():
    """fp32 through Amp is bit for bit the plain backward / step loop (every CPU run is unchanged); fp16 runs
    with torch's GradScaler on the CPU: float16 forward, finite falling loss, scaled gradients, weights
    close to the fp32 ones."""
    plain, lp = _train(None)
    via, lv = _train(hardware.Amp("fp32", "cpu"))
    assert lp == lv and all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), via.state_dict().values()))
    amp = hardware.Amp("fp16", "cpu")
    assert amp.scaler is not None and amp.dtype == torch.float16
    half, lh = _train(amp)
    assert all(map(lambda v: v == v and abs(v) < 1e3, lh)) and lh[-1] < lh[0]
    assert amp.scaler.get_scale() > 1.0  # the loss was scaled (no overflow at this size)
    for a, b in zip(plain.state_dict().values(), half.state_dict().values()):
        assert torch.allclose(a, b, atol=2e-2)  # Adam normalises the fp16 rounding of small gradients


def test_cpu_cache_keys_unchanged():
    """The synthetic-set key of a CPU run is the one of the code before devices existed (values computed
    with HEAD 9bb9a3f); a CUDA generator's set gets another key."""
    from zsq.synth.base import get_synthesizer, synthetic_key

    fp = {"id": "cifar10_resnet20", "weights_sha256": "abc"}
    want = {"zeroq": "zeroq-602b33b7dcb46d7afe9372e1", "genie": "genie-73b1dd9f2016b239eef9fbaa"}
    for name, key in want.items():
        s = get_synthesizer(name, "smoke", {"precision": "fp32"})
        assert synthetic_key(fp, s, "smoke", 0, (3, 32, 32)) == key
        assert synthetic_key(fp, s, "smoke", 0, (3, 32, 32), torch.device("cpu")) == key
        assert synthetic_key(fp, s, "smoke", 0, (3, 32, 32), "cuda:1") != key
        assert synthetic_key(fp, s, "smoke", 0, (3, 32, 32), "cuda:1") == synthetic_key(fp, s, "smoke", 0,
                                                                                       (3, 32, 32), "cuda")


def test_device_record_cpu():
    assert hardware.device_record("cpu") == {"device": "cpu"}
    assert hardware.module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert hardware.module_device(torch.nn.ReLU()) == torch.device("cpu")


def test_gathered_swing_and_roll_equal_the_sliced_ones():
    """The sync-free CUDA forms of Genie's swing window and DeepInversion's roll select the same pixels."""
    import torch.nn.functional as F

    from zsq.synth.genie import gather_window
    from zsq.synth.pixel import gather_roll

    x = torch.randn(2, 3, 9, 7)
    for a in range(-3, 4):
        for b in range(-2, 3):
            assert torch.equal(gather_roll(x, torch.tensor([a, b])), torch.roll(x, (a, b), (2, 3)))
    xp = F.pad(x, [1] * 4, mode="reflect")
    for a in range(3):
        for b in range(3):
            assert torch.equal(gather_window(xp, torch.tensor([a, b]), 9, 7), xp[:, :, b:b + 9, a:a + 7])


# -- the command line ---------------------------------------------------------------------------------
def _zsq(*args, env=None):
    e = {**os.environ, "CI": "true", "COLUMNS": "80", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "zsq", *map(str, args)], capture_output=True, text=True, env=e,
                          timeout=300, cwd=REPO)


def _one_line_error(stderr: str, *needles: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cli_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    r = _zsq("quantize", "cifar10_resnet20", "-r", "squant", "-o", tmp_path / "out", "--device", "cuda")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    _one_line_error(r.stderr, "--device cuda", "CUDA is not available")
    assert not (tmp_path / "out").exists()
    from zsq.cli import main

    for argv in (["synthesize", "cifar10_resnet20", "-r", "zeroq", "--device", "cuda:0"],
                 ["eval", "cifar10_resnet20", "--eval-data", str(tmp_path), "--device", "cuda"],
                 ["bench", "run", "foundation", "--device", "cuda", "--dry-run"],
                 ["quantize", "cifar10_resnet20", "-r", "squant", "-o", str(tmp_path / "o2"), "--device", "tpu"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        _one_line_error(capsys.readouterr().err, "--device")


def _qmodel_tensors(out: Path) -> dict:
    return torch.load(out / "qmodel.pt", map_location="cpu", weights_only=True)["state_dict"]


def test_cli_device_cpu_equals_no_flag(tmp_path):
    """`--device cpu` and no flag write the same qmodel.pt tensors (squant), and zsq.json says cpu."""
    import json

    from zsq.cli import main

    for out, flag in (("a", ["--device", "cpu"]), ("b", [])):
        with pytest.raises(SystemExit) as e:
            main(["quantize", "cifar10_resnet20", "-r", "squant", "-q", "-o", str(tmp_path / out), *flag])
        assert e.value.code == 0
    ta, tb = _qmodel_tensors(tmp_path / "a"), _qmodel_tensors(tmp_path / "b")
    assert ta.keys() == tb.keys()
    for k, v in ta.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, tb[k]), k
    machine = json.loads((tmp_path / "a" / "zsq.json").read_text())["machine"]
    if not torch.cuda.is_available():
        assert machine["device"] == "cpu" and "gpu" not in machine


def test_api_device_cpu_equals_default_with_synthesis(tmp_path, monkeypatch, resnet20):
    """A synthesis recipe (ZeroQ, reduced smoke set) through the API: ``device="cpu"`` and the default give the
    same quantized tensors, each synthesising its own set (separate caches)."""
    ov = {"n_images": 8, "batch_size": 8, "iters": 5}
    sds = []
    for i, dev in enumerate(("cpu", None)):
        monkeypatch.setenv("ZSQ_CACHE", str(tmp_path / f"cache{i}"))
        kw = {} if dev is None else {"device": dev}
        q = zsq.quantize(resnet20, "zeroq", 4, 8, protocol="ptq", budget="smoke", progress=False,
                         synth_overrides=ov, hparams={"w_observer": "minmax"}, **kw)
        sds.append(q.state_dict())
        assert (tmp_path / f"cache{i}" / "synthetic").is_dir()
    for k, v in sds[0].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sds[1][k]), k


# -- every family on the device -------------------------------------------------------------------------
FAMILIES = {
    # recipe: (synth overrides, quantizer hparams) at far below the smoke budget: the device path, not accuracy
    "squant": (None, {}),
    "zeroq": ({"n_images": 8, "batch_size": 8, "iters": 2}, {"w_observer": "minmax", "a_observer": "percentile"}),
    "genie": ({"n_images": 8, "batch_size": 8, "iters": 2},
              {"iters": 2, "batch_size": 4, "w_observer": "minmax", "a_observer": "minmax"}),
    "qat-zeroq": ({"n_images": 8, "batch_size": 8, "iters": 2}, {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4}),
    "gdfq": (None, {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "warmup_epochs": 0, "ema_epochs": 0}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", list(FAMILIES))
def test_family_runs_on_device(recipe, device, tmp_path, monkeypatch, real_batch):
    """squant, ZeroQ + calibration, Genie-M reconstruction, QAT-KD and a generator game run on ``device``:
    the quantized model lives there, computes finite logits there, and saves to a CPU qmodel.pt."""
    monkeypatch.setenv("ZSQ_CACHE", str(tmp_path / "cache"))
    ov, hp = FAMILIES[recipe]
    m = zsq.load_model("cifar10_resnet20")
    q = zsq.quantize(m, recipe, 4, 4, budget="smoke", progress=False, synth_overrides=ov, hparams=hp or None,
                     device=device)
    dev = torch.device(device).type
    assert {t.device.type for t in [*q.parameters(), *q.buffers()]} == {dev}
    with torch.no_grad():
        out = q(real_batch[0][:4].to(device))
    assert out.device.type == dev and torch.isfinite(out).all()
    from zsq.record import record_of

    assert record_of(q).result["device"]["device"] == dev
    zsq.save(q, tmp_path / "out")
    assert {v.device.type for v in _qmodel_tensors(tmp_path / "out").values() if isinstance(v, torch.Tensor)} == {"cpu"}
