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


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file under the process umask (``0o666 & ~umask``):
    :func:`tempfile.mkstemp` creates its file 0600, and a renamed temporary keeps that mode."""
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it; put it back at once
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, new_file_mode())  # what a plain open() would give: not 0600
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


_TRAILER = b"\nzsq-sha256:"


def torch_save_checked(obj, path: str | os.PathLike) -> str:
    """``torch.save`` to ``path`` atomically with the payload's SHA-256 appended as a trailer, so a
    truncated or corrupted file is detected by :func:`torch_load_checked`. Returns the hash."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data + _TRAILER + digest.encode())
    return digest


def torch_load_checked(path: str | os.PathLike, what: str = "checkpoint"):
    """Load a file written by :func:`torch_save_checked` (``weights_only=True``); a missing trailer
    or a payload that does not match it raises :class:`~zsq.errors.ChecksumError`."""
    import io

    import torch

    from .errors import ChecksumError

    raw = Path(path).read_bytes()
    cut = raw.rfind(_TRAILER)
    if cut < 0:
        raise ChecksumError(f"{what} {path} has no checksum (truncated, or not written by this zsq); "
                            "delete it or run without --resume")
    data, digest = raw[:cut], raw[cut + len(_TRAILER):].decode(errors="replace").strip()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ChecksumError(f"{what} {path} fails its SHA-256 check (corrupted); delete it or run without --resume")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_resume_checkpoint(path: Path, what: str, fmt: str, fingerprint: str) -> dict:
    """A run's resume checkpoint (written by :func:`torch_save_checked` with ``format`` and
    ``fingerprint`` keys), refused with a one-line :class:`~zsq.errors.BadValueError` when it cannot
    be read or was written by a run with other settings or data (checksum failures stay
    :class:`~zsq.errors.ChecksumError`)."""
    from .errors import BadValueError, ChecksumError

    try:
        ck = torch_load_checked(path, what)
    except ChecksumError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadValueError(f"cannot read the {what} {path} ({type(e).__name__}); "
                            "delete it or run without --resume") from None
    if not isinstance(ck, dict) or ck.get("format") != fmt or ck.get("fingerprint") != fingerprint:
        raise BadValueError(f"{path} was written by a run with other settings or data; "
                            "delete it or run without --resume")
    return ck
