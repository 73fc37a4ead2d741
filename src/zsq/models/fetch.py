"""Find a weights file: read-only ``ZSQ_HOME`` first, then bundled package data, then ``ZSQ_CACHE``,
then a download from the official URL with a SHA-256 check (never under ``ZSQ_OFFLINE=1``/``CI=true``)."""

from __future__ import annotations

import os
import urllib.request
from importlib import resources
from pathlib import Path

from ..errors import ChecksumError, WeightsError
from ..paths import offline, sha256_file, zsq_cache, zsq_home


def _verified(path: Path, sha256: str | None) -> Path:
    if sha256 and sha256_file(path) != sha256:
        raise ChecksumError(
            f"{path} fails its SHA-256 check (corrupt or a different file): delete it or point ZSQ_HOME elsewhere"
        )
    return path


def bundled(relname: str) -> Path | None:
    """A file shipped inside the package (``zsq/models/weights/<name>``)."""
    p = resources.files("zsq.models").joinpath("weights", relname)
    return Path(str(p)) if p.is_file() else None


def download(url: str, dest: Path, sha256: str | None, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` via a temp file; a checksum mismatch removes it and raises."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            from rich.progress import Progress

            with Progress(disable=not progress or total < (1 << 20), transient=True) as bar:
                task = bar.add_task(f"download {dest.name}", total=total or None)
                while chunk := r.read(1 << 16):
                    f.write(chunk)
                    bar.advance(task, len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"download of {url} failed ({e}); put the file at {dest} or set ZSQ_HOME") from None
    if sha256 and sha256_file(tmp) != sha256:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(f"download of {url} has the wrong SHA-256 and was removed; check the URL or mirror")
    os.replace(tmp, dest)
    return dest


def find_weights(relpath: str, url: str | None, sha256: str | None, bundled_name: str | None = None) -> Path:
    """Resolve ``relpath`` (e.g. ``cifar10-resnet/resnet20.th``) following the cache contract."""
    home = zsq_home()
    if home is not None and (home / relpath).is_file():
        return _verified(home / relpath, sha256)
    if bundled_name and (b := bundled(bundled_name)) is not None:
        return _verified(b, sha256)
    cached = zsq_cache() / relpath
    if cached.is_file():
        return _verified(cached, sha256)
    if offline() or not url:
        where = f"{home / relpath} or {cached}" if home else str(cached)
        why = "offline (ZSQ_OFFLINE=1 or CI=true)" if url else "no download URL is known"
        raise WeightsError(f"weights file {relpath} not found ({why}): place it at {where}")
    return download(url, cached, sha256)
