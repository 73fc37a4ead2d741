"""Ctrl-C at a step boundary: long loops that checkpoint (the QAT engine, resumable synthesizers) let
the first SIGINT finish the current step, save, then raise ``KeyboardInterrupt``; a second SIGINT
interrupts at once."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


@contextlib.contextmanager
def deferred_sigint(note: str | None = None):
    """While inside: the first Ctrl-C only sets ``flag["hit"]`` (and writes ``note`` to stderr, if any);
    the loop checks the flag at the end of its step, checkpoints and raises ``KeyboardInterrupt``. A
    second Ctrl-C interrupts at once. Main thread only, and only where SIGINT is not ignored; elsewhere
    the flag simply stays unset."""
    flag = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    prev = signal.getsignal(signal.SIGINT)
    if prev is signal.SIG_IGN or prev is None:
        yield flag
        return

    def handler(signum, frame):
        if flag["hit"]:
            raise KeyboardInterrupt
        flag["hit"] = True
        if note:
            sys.stderr.write(note + "\n")
            sys.stderr.flush()

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, prev)
