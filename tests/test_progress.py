"""zsq.progress: where stderr is not a terminal (logs, nohup, CI, bench-run children) progress is written as
plain lines: each task once when it finishes, and the running ones at most every ``every`` seconds."""

from __future__ import annotations

import io

import pytest

from zsq.errors import BadValueError
from zsq.progress import LossBar, PlainProgress, loss_progress


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
