"""The one rich progress layout of zsq's long loops (synthesis batches, reconstruction units, evaluation,
loading real images): a bar per task with done/total, the running loss where there is one, elapsed and
remaining time, on stderr (stdout carries results such as ``top1 ...``).

Where stderr is not a terminal (a log file, ``nohup``, CI, a ``zsq bench run`` child) rich draws nothing
until the loop ends, so there :class:`PlainProgress` writes plain lines instead: one when a task
finishes and, for the tasks still running, one at most every ``ZSQ_PROGRESS_EVERY`` seconds (default 60).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def _progress(enabled: bool, loss: bool, transient: bool = False):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return PlainProgress()
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if loss:
        cols.append(TextColumn("loss {task.fields[loss]}"))
    return Progress(*cols, TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient)


def loss_progress(enabled: bool):
    """A started-on-enter progress display with a ``loss`` field per task (rich on a terminal, else
    :class:`PlainProgress`), or ``None``."""
    return _progress(enabled, loss=True)


def count_progress(enabled: bool, transient: bool = False):
    """The same display without the loss (evaluation, image loading): done/total, elapsed and remaining
    time per task; rich on a terminal (``transient``: the bar disappears when done), else
    :class:`PlainProgress`; ``None`` when not ``enabled``."""
    return _progress(enabled, loss=False, transient=transient)


@contextmanager
def counting(enabled: bool, description: str, total: int, transient: bool = True):
    """One counted task for a loop (see :func:`count_progress`): yields ``advance(k)``; started on
    enter, stopped on exit (off a terminal the finished line is written once ``total`` is reached)."""
    p = count_progress(enabled, transient=transient)
    if p is None:
        yield lambda k: None
        return
    p.start()
    try:
        task = p.add_task(description, total=total)
        yield lambda k: p.advance(task, k)
    finally:
        p.stop()


def _every_s() -> float:
    from .errors import BadValueError

    v = os.environ.get("ZSQ_PROGRESS_EVERY", "60")
    try:
        return max(0.0, float(v))
    except ValueError:
        raise BadValueError(f"ZSQ_PROGRESS_EVERY must be a number of seconds, got '{v}'") from None


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0
    fields: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    reported: bool = False  # its finished line is written


class PlainProgress:
    """The subset of ``rich.progress.Progress`` zsq's loops use (``add_task``, ``update``, ``advance``,
    ``remove_task``, ``tasks``, ``start``, ``stop``), written as plain lines to ``stream`` (stderr): a task's
    line when it finishes, and every running task's line at most every ``every`` seconds."""

    def __init__(self, stream=None, every: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.every = _every_s() if every is None else float(every)
        self._tasks: dict[int, _Task] = {}
        self._next = 0
        self._last = time.monotonic()

    @property
    def tasks(self) -> list[_Task]:
        return list(self._tasks.values())

    def start(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        self._next += 1
        self._tasks[self._next] = _Task(description, total, completed, dict(fields))
        return self._next

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, **fields) -> None:
        t = self._tasks[task_id]
        if total is not None:
            t.total = total
        if completed is not None:
            t.completed = completed
        if advance is not None:
            t.completed += advance
        t.fields.update(fields)
        now = time.monotonic()
        if t.total is not None and t.completed >= t.total and not t.reported:
            t.reported = True
            self._write(t, now)
        elif now - self._last >= self.every:
            self._last = now
            for u in self._tasks.values():
                if not u.reported:
                    self._write(u, now)

    def _write(self, t: _Task, now: float) -> None:
        total = "?" if t.total is None else f"{t.total:g}"
        loss = t.fields.get("loss")
        el = int(now - t.started)
        print(f"{t.description.strip()}: {t.completed:g}/{total}" + (f" loss {loss}" if loss not in (None, "-") else "")
              + f" [{el // 60}:{el % 60:02d}]", file=self.stream, flush=True)


def fmt_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4g}"


class LossBar:
    """Base of zsq's progress displays: ``self.p`` is the :func:`loss_progress` (or ``None`` when
    disabled); entering starts it, leaving stops it."""

    def __init__(self, enabled: bool):
        self.p = loss_progress(enabled)

    def __enter__(self):
        if self.p is not None:
            self.p.start()
        return self

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.stop()


class NestedBar(LossBar):
    """The display of a loop over items (epochs, batches, units) of steps: an overall bar over the items
    (``title``, ``total``, ``done`` already) with the last item's loss, and a bar over the current item's
    steps with its running loss (:meth:`start`, :meth:`update`, :meth:`end`). ``title=None``: no overall
    bar, and each item's bar stays listed, filled, when the item ends (reconstruction's units)."""

    def __init__(self, enabled: bool, title: str | None = None, total: int | None = None, done: int = 0):
        super().__init__(enabled)
        self.overall = self.task = None
        if self.p is not None and title is not None:
            self.overall = self.p.add_task(title, total=total, completed=done, loss="-")

    def skip(self, n: int) -> None:
        """``n`` items found done (the overall bar advances)."""
        if self.p is not None and self.overall is not None and n:
            self.p.advance(self.overall, n)

    def start(self, description: str, total: int | None = None, done: int = 0) -> None:
        """The bar of the next item: ``total`` steps (``None``: not known yet), ``done`` of them already."""
        if self.p is not None:
            self.task = self.p.add_task(description, total=total, completed=done, loss="-")

    def update(self, done: int, loss: float | None, total: int | None = None) -> None:
        """``done`` steps of the current item, its running ``loss`` (and its ``total``, once known)."""
        if self.p is not None and self.task is not None:
            self.p.update(self.task, completed=done, total=total, loss=fmt_loss(loss))

    def end(self, loss: float | None) -> None:
        """The current item is finished with ``loss``: its bar goes (is filled, without an overall bar) and
        the overall bar advances."""
        if self.p is None:
            return
        if self.overall is None:
            if self.task is not None:
                self.p.update(self.task, completed=self.p.tasks[-1].total, loss=fmt_loss(loss))
            return
        if self.task is not None:
            self.p.remove_task(self.task)
            self.task = None
        self.p.update(self.overall, advance=1, loss=fmt_loss(loss))

    def note(self, msg: str) -> None:
        """One line on stderr, whether or not the bars are shown (above a live rich display)."""
        console = getattr(self.p, "console", None)
        if console is not None:
            console.print(msg, highlight=False, markup=False, soft_wrap=True)
        else:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
