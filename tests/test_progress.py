"""zsq.progress: where stderr is not a terminal (logs, nohup, CI, bench-run children) progress is written as
plain lines: each task once when it finishes, and the running ones at most every ``every`` seconds."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import CIFAR_TEST, ROOT

from zsq.errors import BadValueError
from zsq.progress import LossBar, PlainProgress, count_progress, loss_progress
from zsq.record import model_info


def test_plain_progress_writes_finished_tasks_once_and_running_ones_periodically(monkeypatch):
    out = io.StringIO()
    p = PlainProgress(out, every=3600)
    p.start()
    a = p.add_task("unit 1/2 layer1.0", total=10, completed=0, loss="-")
    p.update(a, completed=5, loss="0.5")
    assert out.getvalue() == ""  # running, and the period has not passed
    p.update(a, completed=10, loss="0.25")
    p.update(a, completed=10, loss="0.25")  # finished again: not written twice
    b = p.add_task("  batch 0", total=None, loss="-")
    p.update(b, completed=3, total=4, loss="1.5")
    p.advance(b, 1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("unit 1/2 layer1.0: 10/10 loss 0.25 [0:0")
    assert lines[1].startswith("batch 0: 4/4 loss 1.5 [")
    assert [t.total for t in p.tasks] == [10, 4]
    p.remove_task(b)
    assert len(p.tasks) == 1
    # every 0 s: each update writes the tasks still running (finished ones are not repeated)
    out2 = io.StringIO()
    q = PlainProgress(out2, every=0)
    c = q.add_task("qat epochs", total=2, loss="-")
    d = q.add_task("  epoch 1", total=100, loss="-")
    q.update(d, completed=40, loss="0.9")
    assert out2.getvalue().splitlines() == ["qat epochs: 0/2 [0:00]", "epoch 1: 40/100 loss 0.9 [0:00]"]
    q.update(c, advance=1)
    assert out2.getvalue().splitlines()[-2:] == ["qat epochs: 1/2 [0:00]", "epoch 1: 40/100 loss 0.9 [0:00]"]
    # the period comes from ZSQ_PROGRESS_EVERY when not given
    monkeypatch.setenv("ZSQ_PROGRESS_EVERY", "5")
    assert PlainProgress(io.StringIO()).every == 5.0
    monkeypatch.setenv("ZSQ_PROGRESS_EVERY", "often")
    with pytest.raises(BadValueError, match="ZSQ_PROGRESS_EVERY must be a number of seconds, got 'often'"):
        PlainProgress(io.StringIO())


def test_loss_progress_is_plain_off_a_terminal_and_none_when_disabled():
    assert loss_progress(False) is None
    assert isinstance(loss_progress(True), PlainProgress)  # pytest captures stderr: not a terminal
    with LossBar(True) as bar:
        assert isinstance(bar.p, PlainProgress)
    assert count_progress(False) is None
    assert isinstance(count_progress(True), PlainProgress)


def test_zsq_eval_off_a_terminal_writes_progress_lines_on_stderr_and_results_on_stdout():
    # stderr is a pipe (as under nohup, CI, a bench-run child): the rich bar would draw nothing there
    env = {**os.environ, "CI": "true", "ZSQ_PROGRESS_EVERY": "0"}
    cmd = [sys.executable, "-m", "zsq", "eval", "cifar10_resnet20", "--data", str(CIFAR_TEST), "--threads", "1"]
    r = subprocess.run(cmd + ["--limit", "1000"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = re.findall(r"^eval test\.tar: (\d+)/1000 \[\d+:\d\d\]$", r.stderr, re.M)
    assert len(lines) >= 2, r.stderr  # running lines (every 0 s: each batch) and the finished one
    assert [int(n) for n in lines] == sorted(int(n) for n in lines) and lines[-1] == "1000"
    assert re.search(r"^top1 \d+\.\d\d$", r.stdout, re.M), r.stdout
    assert "eval test.tar" not in r.stdout
    # --quiet: no progress at all
    q = subprocess.run(cmd + ["--limit", "100", "-q"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert q.returncode == 0, q.stderr
    assert "eval test.tar" not in q.stderr + q.stdout and re.search(r"^top1 ", q.stdout, re.M)


def test_real_calibration_images_are_counted_while_they_load(resnet20, capsys, monkeypatch):
    from zsq.data.eval import load_images

    monkeypatch.setenv("ZSQ_PROGRESS_EVERY", "0")
    pre = model_info(resnet20).preprocess
    x, y = load_images(CIFAR_TEST, pre, 300, seed=3, progress=True)  # decoded 256 at a time
    err = capsys.readouterr().err.splitlines()
    assert [ln.rsplit(" [", 1)[0] for ln in err] == ["loading 300 images from test.tar: 256/300",
                                                     "loading 300 images from test.tar: 300/300"], err
    x2, y2 = load_images(CIFAR_TEST, pre, 300, seed=3)  # quiet by default; the same images
    assert capsys.readouterr().err == ""
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (300, 3, 32, 32)
    # zsq.quantize(calib=...) shows the loading unless progress=False
    import zsq

    zsq.quantize(resnet20, "zeroq", 8, 8, protocol="ptq", budget="smoke", calib=str(CIFAR_TEST), calib_n=20)
    assert "loading 20 images from test.tar: 20/20" in capsys.readouterr().err
    zsq.quantize(resnet20, "zeroq", 8, 8, protocol="ptq", budget="smoke", calib=str(CIFAR_TEST), calib_n=20,
                 progress=False)
    assert "loading" not in capsys.readouterr().err


def test_export_check_shows_progress_of_both_evaluations(resnet20, tmp_path):
    import zsq

    out = tmp_path / "sq"
    zsq.save(zsq.quantize(resnet20, "squant", 4, 8, progress=False), out)
    env = {**os.environ, "CI": "true", "ZSQ_PROGRESS_EVERY": "0"}
    r = subprocess.run([sys.executable, "-m", "zsq", "export", str(out), "--check", str(CIFAR_TEST), "--check-limit",
                        "600", "--threads", "1"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    done = re.findall(r"^(eval test\.tar(?: \(onnxruntime\))?): 600/600 \[", r.stderr, re.M)
    assert done == ["eval test.tar", "eval test.tar (onnxruntime)"], r.stderr  # PyTorch, then ONNX Runtime
    assert re.search(r"^eval test\.tar: 256/600 \[", r.stderr, re.M), r.stderr  # a running line too
    assert re.search(r"^top1 pytorch [\d.]+  onnxruntime [\d.]+", r.stdout, re.M) and "eval " not in r.stdout
