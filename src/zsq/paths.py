"""Where zsq reads (``ZSQ_HOME``, read-only) and writes (``ZSQ_CACHE``), and atomic-write helpers."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
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


#: errno values of a write that the file system refused (read-only, no permission, full, quota, I/O)
WRITE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG,
                          errno.EIO})
_HINTS = {
    errno.EROFS: "the file system is read-only; choose another output directory",
    errno.ENOSPC: "no space left on the device; free some space or choose another output directory",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another output directory",
    errno.EACCES: "permission denied; choose a directory you can write to",
    errno.EPERM: "permission denied; choose a directory you can write to",
}
# torch.save to a path reports a failed write (full disk) as a RuntimeError from its zip writer
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def output_error(exc: BaseException, path: str | os.PathLike):
    """The one-line :class:`~zsq.errors.OutputError` for a failed write of ``path``."""
    from .errors import OutputError

    if isinstance(exc, OSError):
        hint = _HINTS.get(exc.errno) or f"{exc.strerror or exc}; choose another output directory"
    elif _free_bytes(Path(path)) < 2**20:  # torch's zip writer says only "unexpected pos"
        hint = _HINTS[errno.ENOSPC]
    else:
        hint = "the write failed (is the disk full?); free some space or choose another output directory"
    return OutputError(f"cannot write {path}: {hint}")


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent); large if unknown."""
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return 1 << 62


@contextlib.contextmanager
def writing(path: str | os.PathLike, every: bool = False):
    """Turn a write the file system refuses (an ``OSError`` in :data:`WRITE_ERRNOS`, or with ``every``
    any ``OSError``; torch's zip-writer failure on a full disk) into a one-line
    :class:`~zsq.errors.OutputError` naming ``path``; other errors pass unchanged."""
    from .errors import ZsqError

    try:
        yield
    except ZsqError:
        raise
    except OSError as e:
        if every or e.errno in WRITE_ERRNOS:
            raise output_error(e, path) from e
        raise
    except RuntimeError as e:
        if any(s in str(e) for s in _TORCH_WRITE_FAILURES):
            raise output_error(e, path) from e
        raise


def check_writable(directory: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Make ``directory`` (and its parents) if needed, then write, sync and remove a small probe file in
    it, so that an output that cannot be written (read-only, no permission, full disk) is a one-line
    :class:`~zsq.errors.OutputError` before any long work. ``need_bytes``: a lower bound of what the
    caller will write there; a file system with less free space is refused too."""
    from .errors import OutputError

    d = Path(directory)
    with writing(d, every=True):
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".zsq-probe-", suffix=".tmp", dir=d)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free = shutil.disk_usage(d).free
    if need_bytes and free < need_bytes:
        raise OutputError(f"cannot write {d}: it needs at least {_mib(need_bytes)} and its file system has "
                          f"{_mib(free)} free; free some space or choose another output directory")
    return d


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it; put it back at once
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file under the process umask (``0o666 & ~umask``):
    :func:`tempfile.mkstemp` creates its file 0600, and a renamed temporary keeps that mode."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """The mode ``mkdir()`` would give a new directory under the process umask (``0o777 & ~umask``):
    :func:`tempfile.mkdtemp` creates it 0700."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds. A write the
    file system refuses becomes a one-line :class:`~zsq.errors.OutputError` (:func:`writing`) and the
    temporary file is removed: nothing half-written is left under either name."""
    path = Path(path)
    with writing(path, every=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, new_file_mode())  # what a plain open() would give: not 0600
        os.close(fd)
    try:
        with writing(path):
            yield Path(tmp)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
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
