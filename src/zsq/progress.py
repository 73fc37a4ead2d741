"""The one rich progress layout of zsq's long loops (synthesis batches, reconstruction units): a bar
per task with done/total, the running loss, elapsed and remaining time, on stderr (stdout carries
results such as ``top1 ...``)."""

from __future__ import annotations


def loss_progress(enabled: bool):
    """A started-on-enter ``rich.progress.Progress`` with a ``loss`` field per task, or ``None``."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True))


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
