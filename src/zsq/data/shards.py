"""Synthetic image sets on disk: checksummed shards + ``meta.json``.

A finished set is a directory::

    shard_00000.pt    torch.save({"images": float32 (n, 3, H, W), ...}), loadable with weights_only=True
    shard_00000.json  sidecar: index, sha256 of the .pt, n, wall time, loss, key (written after the .pt)
    ...
    meta.json         written last and atomically: config, per-shard sha256, n_images, wall times

A directory without ``meta.json`` is unfinished (the synthesizer resumes it); one whose shards do
not match the checksums in ``meta.json`` is rejected by :meth:`SyntheticSet.load` with a one-line
:class:`~zsq.errors.DataError`. The sidecars make each shard self-describing, so several processes
(``torch.distributed`` ranks) can write disjoint shards of one set without sharing ``meta.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ChecksumError, DataError
from ..paths import atomic_path, sha256_file, write_json_atomic, zsq_cache

META = "meta.json"
SCHEMA_VERSION = 1


def synthetic_root() -> Path:
    """``ZSQ_CACHE/synthetic``: where :func:`zsq.synth.synthesize` keeps its sets by key."""
    return zsq_cache() / "synthetic"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.pt"


def sidecar_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def combined_sha256(shard_shas: list[str]) -> str:
    """The set's hash: SHA-256 over the shard hashes in index order."""
    h = hashlib.sha256()
    for s in shard_shas:
        h.update(s.encode())
    return h.hexdigest()


def write_shard(path: str | os.PathLike, tensors: dict[str, Tensor]) -> str:
    """Save a dict of tensors atomically (contiguous, detached, CPU) and return its SHA-256.

    Serialised in memory first: ``torch.save`` to a path names the zip's root folder after the
    (random, temporary) file name, so equal tensors would give different bytes and hashes.
    Through a buffer, equal content gives byte-identical shards, and a set's ``sha256`` identifies
    its images across runs and machines.
    """
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    buf = io.BytesIO()
    torch.save(clean, buf)
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def read_shard_bytes(directory: str | os.PathLike, index: int) -> dict[str, Any]:
    """Shard ``index`` of ``directory`` as ``{index, data, sidecar}`` (raw bytes), to send elsewhere."""
    pt = Path(directory) / shard_name(index)
    return {"index": int(index), "data": pt.read_bytes(), "sidecar": json.loads(sidecar_path(pt).read_text())}


def write_shard_bytes(directory: str | os.PathLike, item: dict[str, Any]) -> bool:
    """Write a shard received from :func:`read_shard_bytes` unless an identical one is already there
    (a shared filesystem). The bytes must match the sidecar's SHA-256. Returns whether it wrote."""
    pt = Path(directory) / shard_name(int(item["index"]))
    want = item["sidecar"]["sha256"]
    if hashlib.sha256(item["data"]).hexdigest() != want:
        raise ChecksumError(f"received shard {pt.name} does not match its SHA-256")
    if pt.is_file() and sidecar_path(pt).is_file() and hashlib.sha256(pt.read_bytes()).hexdigest() == want:
        return False
    with atomic_path(pt) as tmp:
        Path(tmp).write_bytes(item["data"])
    write_json_atomic(sidecar_path(pt), item["sidecar"])
    return True


def read_shard(path: str | os.PathLike, sha256: str | None = None) -> dict[str, Tensor]:
    """Load one shard with ``weights_only=True``; verify its SHA-256 when given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"synthetic shard {path} is missing; delete {path.parent} and synthesize again")
    if sha256 is not None and sha256_file(path) != sha256:
        raise DataError(f"synthetic shard {path} fails its checksum (corrupt or modified); "
                        f"delete {path.parent} and synthesize again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"cannot read synthetic shard {path} ({type(e).__name__}); "
                        f"delete {path.parent} and synthesize again") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), Tensor):
        raise DataError(f"synthetic shard {path} holds no 'images' tensor; delete {path.parent} and synthesize again")
    return obj


class DamagedSetError(DataError):
    """A finished set that does not check out. ``problem``: what is wrong, without the fix the message
    adds ("delete DIR and synthesize again"), for :func:`zsq.synth.synthesize`, which repairs the set
    instead; ``shard``: the shard whose checksum fails, when that is the problem (the repair reports it
    where it makes the shard again)."""

    def __init__(self, problem: str, directory: Path, shard: Path | None = None):
        super().__init__(f"{problem}; delete {directory} and synthesize again")
        self.problem, self.shard = problem, shard


@dataclass
class SyntheticSet:
    """A set of synthetic images on disk (complete, or the shards one process made of it).

    ``images`` (and ``labels`` when the synthesizer made them) are concatenated lazily in shard
    order. ``sha256`` is the hash over the shard hashes (``None`` while incomplete).
    """

    dir: Path
    meta: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)  # {"file", "sha256", "n", ...} present
    complete: bool = True
    _cache: dict[str, Tensor | None] = field(default_factory=dict, repr=False)

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike, verify: bool = True) -> SyntheticSet:
        """Open a finished set (``--synthetic DIR``), checking every shard against ``meta.json``."""
        d = Path(directory)
        if not d.is_dir():
            raise DataError(f"synthetic data directory {d} does not exist")
        mp = d / META
        if not mp.is_file():
            raise DataError(f"{d} has no {META}: not a finished synthetic set (synthesize again or pass another DIR)")
        try:
            meta = json.loads(mp.read_text())
            shards = list(meta["shards"])
            n_images = int(meta["n_images"])
            files = [(str(s["file"]), str(s["sha256"]), int(s["n"])) for s in shards]
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedSetError(f"{mp} is malformed ({type(e).__name__}: {e})", d) from None
        if sum(n for _, _, n in files) != n_images:
            raise DataError(f"{mp} lists shards with {sum(n for _, _, n in files)} images, not n_images={n_images}")
        for f, sha, _ in files:
            p = d / f
            if Path(f).name != f:
                raise DataError(f"{mp} names a shard outside its directory: {f}")
            if not p.is_file():
                raise DamagedSetError(f"synthetic shard {p} is missing", d)
            if verify and sha256_file(p) != sha:
                raise DamagedSetError(f"synthetic shard {p} fails its checksum (corrupt or modified)", d, shard=p)
        if meta.get("sha256") and meta["sha256"] != combined_sha256([sha for _, sha, _ in files]):
            raise DamagedSetError(f"{mp}: set sha256 does not match its shard hashes", d)
        return cls(dir=d, meta=meta, shards=shards, complete=True)

    # -- contents -----------------------------------------------------------------------------------
    def _concat(self, key: str) -> Tensor | None:
        if key not in self._cache:
            parts = []
            for s in self.shards:
                # checksums were verified when the set was opened / written
                t = read_shard(self.dir / s["file"]).get(key)
                if t is None:
                    self._cache[key] = None
                    return None
                parts.append(t)
            t = torch.cat(parts) if parts else None
            if key == "images" and t is not None and not torch.isfinite(t).all():
                raise DataError(f"synthetic set {self.dir} holds non-finite images (its synthesis diverged); "
                                f"delete {self.dir} and synthesize again")
            self._cache[key] = t
        return self._cache[key]

    @property
    def images(self) -> Tensor:
        """All images, float32 (N, 3, H, W), in the model's normalised input space."""
        t = self._concat("images")
        if t is None:
            raise DataError(f"synthetic set {self.dir} holds no images")
        return t

    @property
    def labels(self) -> Tensor | None:
        """Target labels, for synthesizers that use them; ``None`` otherwise."""
        return self._concat("labels")

    def shard(self, index: int) -> dict[str, Tensor]:
        """The tensors of global batch ``index``."""
        for s in self.shards:
            if int(s["index"]) == index:
                return read_shard(self.dir / s["file"])
        raise KeyError(f"shard {index} is not in {self.dir}")

    @property
    def n_images(self) -> int:
        return sum(int(s["n"]) for s in self.shards)

    @property
    def sha256(self) -> str | None:
        return combined_sha256([s["sha256"] for s in self.shards]) if self.complete else None

    def __len__(self) -> int:
        return self.n_images

    def to_dict(self) -> dict[str, Any]:
        """What ``zsq.json`` records under ``synthetic``."""
        return {"dir": str(self.dir), "sha256": self.sha256, "n_images": self.n_images}

    def __repr__(self) -> str:
        state = "" if self.complete else f", incomplete {len(self.shards)}/{self.meta.get('n_shards')} shards"
        return f"SyntheticSet({str(self.dir)!r}, n_images={self.n_images}{state})"


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` atomically (the marker of a finished set)."""
    write_json_atomic(directory / META, meta)
