"""Where zsq reads (``ZSQ_HOME``, read-only) and writes (``ZSQ_CACHE``), and atomic-write helpers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path


def zsq_home() -> Path | None:
    h = os.environ.get("ZSQ_HOME")
    return Path(h).expanduser() if h else None


def zsq_cache() -> Path:
    c = os.environ.get("ZSQ_CACHE")
    return Path(c).expanduser() if c else Path.home() / ".cache" / "zsq"


def offline() -> bool:
    """No download attempts under ``ZSQ_OFFLINE=1`` or ``CI=true``."""
    return os.environ.get("ZSQ_OFFLINE", "") not in ("", "0") or os.environ.get("CI", "").lower() == "true"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save_atomic(obj, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
