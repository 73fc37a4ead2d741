"""The readers behind :mod:`zsq.data.eval`'s datasets: one :class:`_Source` per path form (an ImageFolder
directory, a tar of one read member by member, CIFAR-10/100 python batches read with an unpickler that
builds numpy arrays only), the layout checks with their one-line errors, and the in-process cache of
decoded small images (:func:`clear_cache`). :mod:`zsq.data.eval` describes the accepted paths."""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
import tarfile
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import DataError


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SMALL_PIXELS = 96 * 96  # images up to this many pixels are decoded once into a uint8 cache
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_TEST = {"test_batch": 10, "test": 100}  # eval batch file name -> number of classes
_CIFAR_META = {10: ("batches.meta", b"label_names"), 100: ("meta", b"fine_label_names")}
_LAYOUT_HINT = "expected ROOT/<class>/<image> with one folder per class"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


# --------------------------------------------------------------------------------------------------
# Safe CIFAR pickles


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core import multiarray as ma, numeric as nu
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray as ma, numeric as nu  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = ma._reconstruct
        allowed[(f"{pkg}.numeric", "_frombuffer")] = nu._frombuffer
    allowed[("_codecs", "encode")] = _latin1_encode  # how Python 3 writes bytes at protocol 2
    return allowed


def _latin1_encode(obj, encoding="utf-8"):
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise DataError(f"refusing _codecs.encode(..., {encoding!r}) in a CIFAR pickle")
    return obj.encode("latin1")


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, dtypes and plain containers."""

    def find_class(self, module, name):
        obj = _numpy_globals().get((module, name))
        if obj is None:
            raise DataError(f"refusing to unpickle {module}.{name}: CIFAR batches hold only numpy arrays")
        return obj


def _load_cifar_pickle(data: bytes, what: str) -> dict:
    try:
        obj = _NumpyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"cannot read CIFAR batch {what}: {type(e).__name__} (corrupt or not a CIFAR pickle)") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR batch {what} holds a {type(obj).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


# --------------------------------------------------------------------------------------------------
# Sources: where the images of one path live. Cached per (resolved path, size, mtime).


class _Source:
    """All images of one path, in label-then-name order; decodes lazily and caches small images."""

    path: Path
    classes: list[str]
    names: list[str]
    labels: torch.Tensor  # int64 (N,)

    def __init__(self):
        self._lock = threading.Lock()
        self._pixels: torch.Tensor | None = None  # uint8 (N, 3, H, W) once the first image is known
        self._done: torch.Tensor | None = None  # bool (N,)
        self._small: bool | None = None

    def __len__(self) -> int:
        return len(self.names)

    #: True for a source that can only be read front to back (a large compressed tar): its images come
    #: through :meth:`stream`, one pass per call, never all held in memory
    sequential = False

    def __getstate__(self):  # DataLoader workers started by spawn / forkserver get a copy without the lock
        state = self.__dict__.copy()
        state.pop("_lock", None)
        if "_fd" in state:
            state["_fd"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # --- raw access ---------------------------------------------------------------------------
    def read(self, i: int) -> bytes:  # encoded image bytes
        raise NotImplementedError

    def image(self, i: int, data: bytes | None = None):
        """Image ``i`` as an RGB PIL image (decoded from ``data``, its bytes, when the caller has them)."""
        from PIL import Image

        if data is None:
            data = self.read(i)
        try:
            im = Image.open(io.BytesIO(data))
            im.load()
            return im if im.mode == "RGB" else im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
            # PIL names the in-memory file it was given (``<_io.BytesIO object at 0x...>``): not the user's
            detail = re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", str(e)).strip()
            raise DataError(f"cannot decode image {self.names[i]} in {self.path}: {type(e).__name__}"
                            f"{': ' + detail if detail else ''} (corrupt or not an image)") from None

    def _array(self, i: int) -> np.ndarray:
        return np.asarray(self.image(i))  # (H, W, 3) uint8, read-only

    # --- uint8 cache for small images ----------------------------------------------------------
    @property
    def small(self) -> bool:
        """Whether images are small enough (and of one size) to be decoded into the uint8 cache."""
        if self._small is None:
            first = self._array(0)
            h, w = first.shape[:2]
            self._small = h * w <= SMALL_PIXELS
            if self._small:
                # normal tensors even when first touched under inference_mode (evaluation): an
                # inference tensor could not be updated later outside it (calibration images)
                with torch.inference_mode(False):
                    self._pixels = torch.empty((len(self), 3, h, w), dtype=torch.uint8)
                    self._done = torch.zeros(len(self), dtype=torch.bool)
                self._pixels[0] = torch.from_numpy(first.copy()).permute(2, 0, 1)
                self._done[0] = True
        return self._small

    def pixels(self, index: torch.Tensor) -> torch.Tensor | None:
        """uint8 (k, 3, H, W) images for ``index``, decoding only those not yet cached.

        Returns None when the images are not small, or turn out not to share one size.
        """
        if not self.small:
            return None
        with self._lock:
            assert self._pixels is not None and self._done is not None
            todo = index[~self._done[index]].unique()
            if len(todo):
                arrays = [self._array(i) for i in todo.tolist()]
                if any(a.shape != arrays[0].shape for a in arrays) or arrays[0].shape[:2] != self._pixels.shape[2:]:
                    self._small, self._pixels, self._done = False, None, None  # mixed sizes: per-image path
                    return None
                self._pixels[todo] = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
                self._done[todo] = True
            return self._pixels[index]


class _FolderSource(_Source):
    def __init__(self, path: Path, root: Path, classes: list[str], files: list[tuple[str, int]]):
        super().__init__()
        self.path, self.root, self.classes = path, root, classes
        self.names = [f for f, _ in files]
        self.labels = torch.tensor([c for _, c in files], dtype=torch.int64)

    def read(self, i: int) -> bytes:
        try:
            return (self.root / self.names[i]).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read image {self.names[i]} in {self.path}: {e.strerror}") from None


class _TarSource(_Source):
    """Members of an uncompressed tar are read with ``os.pread`` at their offsets; a compressed tar's
    image members are held in memory (it cannot be read at random)."""

    def __init__(self, path: Path, classes, files, offsets=None, blobs=None):
        super().__init__()
        self.path, self.classes = path, classes
        self.names = [f for f, _ in files]
        self.labels = torch.tensor([c for _, c in files], dtype=torch.int64)
        self._offsets, self._blobs = offsets, blobs
        self._fd: int | None = None

    def read(self, i: int) -> bytes:
        if self._blobs is not None:
            return self._blobs[i]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        off, size = self._offsets[i]
        data = os.pread(self._fd, size, off)
        if len(data) != size:
            raise DataError(f"cannot read {self.names[i]} from {self.path}: the tar is truncated")
        return data

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


class _ArraySource(_Source):
    """CIFAR python batch: already uint8 (N, 3, 32, 32)."""

    def __init__(self, path: Path, classes, names, labels: torch.Tensor, pixels: torch.Tensor):
        super().__init__()
        self.path, self.classes, self.names, self.labels = path, classes, names, labels
        self._pixels, self._done, self._small = pixels, torch.ones(len(names), dtype=torch.bool), True

    def image(self, i: int):
        from PIL import Image

        return Image.fromarray(self._pixels[i].permute(1, 2, 0).numpy())


# --------------------------------------------------------------------------------------------------
# Layout detection, shared by directories and tars


def _layout(path: Path, files: list[str], dirs: set[str]) -> tuple[str, list[str], list[tuple[str, int]]]:
    """Find the ImageFolder root among relative posix ``files`` (all files) and ``dirs`` (folders).

    Returns (prefix of the root, sorted classes, [(relative file, label)] sorted by class then name).
    """
    files = [f for f in files if not _hidden(f.split("/"))]
    dirs = {d for d in dirs if d and not _hidden(d.split("/"))}
    parents: set[str] = set()
    for f in files:  # every parent of a file is a folder, whether or not the tar lists it
        i = f.rfind("/")
        while i > 0 and f[:i] not in parents:
            parents.add(f[:i])
            i = f.rfind("/", 0, i)
    for d in list(dirs):  # and so is every parent of a listed folder
        parents.update(d[:i] for i in range(len(d)) if d[i] == "/")
    dirs |= parents
    if not files and not dirs:
        raise DataError(f"{path} is empty: {_LAYOUT_HINT}")
    images = [f for f in files if _is_image(f)]
    if not images:
        raise DataError(f"{path} holds no image files ({', '.join(IMG_EXTENSIONS)}): {_LAYOUT_HINT}")

    def classes_under(prefix: str) -> list[str]:
        depth = prefix.count("/")
        return sorted(d[len(prefix):] for d in dirs if d.startswith(prefix) and d.count("/") == depth)

    prefix = ""
    top = classes_under("")
    if len(top) == 1 and not any("/" not in f for f in images):
        inner = top[0] + "/"
        if any(f.startswith(inner) and f.count("/") >= 2 for f in images):  # x/test/<class>/<image>
            prefix = inner
    classes = classes_under(prefix)
    index = {c: k for k, c in enumerate(classes)}
    out = []
    for f in images:
        if not f.startswith(prefix):
            continue
        rel = f[len(prefix):]
        if "/" not in rel:
            continue  # loose image next to the class folders: not part of any class
        out.append((f, index[rel.split("/", 1)[0]]))
    if not out:
        where = f"{path}/{prefix}" if prefix else str(path)
        raise DataError(f"{where} is not in ImageFolder layout (images but no class folders): {_LAYOUT_HINT}")
    out.sort(key=lambda t: (t[1], t[0]))
    return prefix, classes, out


def _scan_dir(path: Path) -> tuple[list[str], set[str]]:
    files, dirs = [], set()
    for cur, subdirs, names in os.walk(path, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        rel = Path(cur).relative_to(path).as_posix()
        base = "" if rel == "." else rel + "/"
        dirs.update(base + d for d in subdirs)
        files.extend(base + n for n in names if not n.startswith("."))
    return files, dirs


def _cifar_from_batches(path: Path, batch: bytes, meta: bytes | None, what: str) -> _ArraySource:
    d = _load_cifar_pickle(batch, what)
    data = d.get("data")
    labels = d.get("labels", d.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None:
        raise DataError(f"{what} is not a CIFAR batch (needs 'data' of shape (N, 3072) and 'labels')")
    if len(labels) != len(data):
        raise DataError(f"{what} has {len(data)} images but {len(labels)} labels")
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in d.get("filenames", [])]
    if len(names) != len(data):
        names = [f"{i:05d}" for i in range(len(data))]
    num = 100 if "fine_labels" in d else 10
    classes: list[str] | None = None
    if meta is not None:
        m = _load_cifar_pickle(meta, f"{what} (meta)")
        key = _CIFAR_META[num][1].decode()
        if isinstance(m.get(key), list):
            classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in m[key]]
    if classes is None:
        classes = list(CIFAR10_CLASSES) if num == 10 else [f"class{k:03d}" for k in range(num)]
    lab = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(lab) == 0:
        raise DataError(f"{what} is empty")
    if int(lab.min()) < 0 or int(lab.max()) >= len(classes):
        raise DataError(f"{what} has labels outside 0..{len(classes) - 1}")
    order = torch.sort(lab, stable=True).indices  # class-major, batch order within a class
    pixels = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).reshape(-1, 3, 32, 32)[order].clone()
    return _ArraySource(path, classes, [names[i] for i in order.tolist()], lab[order].clone(), pixels)


def _cifar_dir(path: Path) -> _ArraySource | None:
    for name, num in _CIFAR_TEST.items():
        if (path / name).is_file():
            meta = path / _CIFAR_META[num][0]
            return _cifar_from_batches(
                path, (path / name).read_bytes(), meta.read_bytes() if meta.is_file() else None, str(path / name)
            )
    return None


def _cifar_file(path: Path) -> _ArraySource:
    """A single CIFAR batch file (``test_batch``, ``data_batch_1``, ``test``, ``train``)."""
    meta = None
    for num in (10, 100):
        m = path.parent / _CIFAR_META[num][0]
        if m.is_file():
            meta = m.read_bytes()
            break
    return _cifar_from_batches(path, path.read_bytes(), meta, str(path))


def _open_tar(path: Path) -> _Source:
    try:
        compressed = _is_compressed(path)
        if compressed:
            return _open_tar_stream(path)
        with tarfile.open(path, "r:") as tf:
            members = tf.getmembers()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"cannot read tar {path}: {type(e).__name__}: {e} (corrupt or truncated?)") from None
    files = {_norm(m.name): m for m in members if m.isfile()}
    dirs = {_norm(m.name) for m in members if m.isdir()}
    cifar = _cifar_in_members(path, files, lambda m: _read_member(path, m))
    if cifar is not None:
        return cifar
    _, classes, out = _layout(path, list(files), dirs)
    offsets = [(files[f].offset_data, files[f].size) for f, _ in out]
    return _TarSource(path, classes, out, offsets=offsets)


def _read_member(path: Path, m: tarfile.TarInfo) -> bytes:
    with open(path, "rb") as f:
        f.seek(m.offset_data)
        return f.read(m.size)


BLOB_LIMIT = 512 << 20  # a compressed tar whose image members hold more bytes than this is streamed


def _open_tar_stream(path: Path) -> _Source:
    """A compressed tar (it cannot be read at random): one pass lists it; its image members' bytes stay
    in memory while they add up to at most :data:`BLOB_LIMIT`, else the pass drops them and the images
    are read by further passes (:class:`_TarStreamSource`)."""
    blobs: dict[str, bytes] | None = {}
    total = 0
    dirs: set[str] = set()
    files: dict[str, tarfile.TarInfo] = {}
    cifar_blobs: dict[str, bytes] = {}
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            name = _norm(m.name)
            if m.isdir():
                dirs.add(name)
            elif m.isfile():
                files[name] = m
                base = PurePosixPath(name).name
                if base in _CIFAR_TEST or base in ("batches.meta", "meta"):
                    cifar_blobs[name] = tf.extractfile(m).read()
                elif _is_image(name) and blobs is not None:
                    total += m.size
                    if total > BLOB_LIMIT:
                        blobs = None  # too big to hold: stream it
                    else:
                        blobs[name] = tf.extractfile(m).read()
    if not any(_is_image(f) for f in files):
        cifar = _cifar_in_members(path, {k: v for k, v in files.items() if k in cifar_blobs},
                                  lambda m: cifar_blobs[_norm(m.name)])
        if cifar is not None:
            return cifar
    _, classes, out = _layout(path, list(files), dirs)
    if blobs is None:
        return _TarStreamSource(path, classes, out)
    return _TarSource(path, classes, out, blobs=[blobs[f] for f, _ in out])


class _TarStreamSource(_Source):
    """A compressed tar too large to hold: :meth:`stream` decompresses it front to back and yields the
    wanted members' bytes in archive order; nothing but the names and labels stays in memory."""

    sequential = True

    def __init__(self, path: Path, classes, files):
        super().__init__()
        self.path, self.classes = path, classes
        self.names = [f for f, _ in files]
        self.labels = torch.tensor([c for _, c in files], dtype=torch.int64)
        self._small = False  # never decoded into the uint8 cache: that would hold the whole set

    def stream(self, wanted: Sequence[int]):
        """``(i, bytes)`` for every ``i`` in ``wanted``, in archive order, in one pass."""
        where = {self.names[i]: i for i in wanted}
        left = len(where)
        if not left:
            return
        try:
            with tarfile.open(self.path, "r|*") as tf:
                for m in tf:
                    i = where.get(_norm(m.name)) if m.isfile() else None
                    if i is not None:
                        yield i, tf.extractfile(m).read()
                        left -= 1
                        if not left:
                            return
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"cannot read tar {self.path}: {type(e).__name__}: {e} (changed or truncated?)") from None
        raise DataError(f"{self.path} changed while it was read: {left} images are missing")

    def read(self, i: int) -> bytes:  # random access: a pass of its own (ImageSet reads in passes instead)
        for _, data in self.stream([i]):
            return data
        raise DataError(f"cannot read {self.names[i]} from {self.path}")


def _cifar_in_members(path: Path, files: dict, read) -> _ArraySource | None:
    if any(_is_image(f) for f in files):
        return None
    for f, m in files.items():
        base = PurePosixPath(f)
        if base.name in _CIFAR_TEST:
            meta_name = str(base.parent / _CIFAR_META[_CIFAR_TEST[base.name]][0]).removeprefix("./")
            meta = read(files[meta_name]) if meta_name in files else None
            return _cifar_from_batches(path, read(m), meta, f"{path}:{f}")
    return None


def _norm(name: str) -> str:
    """Member name relative to the archive root: no leading ``/`` or ``./``, no trailing ``/``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"


@functools.lru_cache(maxsize=4)
def _source_cached(kind: str, path: Path, stamp: tuple) -> _Source:
    if kind == "tar":
        return _open_tar(path)
    if kind == "cifar-file":
        return _cifar_file(path)
    if kind == "cifar-dir":
        src = _cifar_dir(path)
        assert src is not None
        return src
    rows, dirs = stamp  # directory: (file, size, mtime) rows and sub-folders
    _, classes, out = _layout(path, [f for f, _, _ in rows], set(dirs))
    return _FolderSource(path, path, classes, out)


def _source(path: str | os.PathLike) -> _Source:
    """The (cached) source for ``path``; raises DataError for anything that is not a dataset."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {path} does not exist")
    p = p.resolve()
    if p.is_file():
        st = p.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        if st.st_size == 0:
            raise DataError(f"{path} is an empty file")
        try:
            is_tar = tarfile.is_tarfile(p)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None
        if is_tar:
            return _source_cached("tar", p, stamp)
        if _is_compressed(p) or p.name.lower().endswith((".tar", ".tgz")):
            raise DataError(f"cannot read tar {path}: not a readable tar archive (corrupt or truncated?)")
        with open(p, "rb") as f:
            is_pickle = f.read(1) == b"\x80"
        if is_pickle:
            return _source_cached("cifar-file", p, stamp)
        raise DataError(
            f"{path} is neither a tar archive nor a CIFAR batch: pass an ImageFolder directory or a .tar of one"
        )
    if not p.is_dir():
        raise DataError(f"{path} is not a file or directory")
    # CIFAR python batches: the batches dir itself, or a dir holding exactly it
    entries = [e for e in os.listdir(p) if not e.startswith(".")]
    if not entries:
        raise DataError(f"{path} is empty: {_LAYOUT_HINT}")
    for cand in [p] + ([p / entries[0]] if len(entries) == 1 and (p / entries[0]).is_dir() else []):
        if any((cand / n).is_file() for n in _CIFAR_TEST):
            names = [*_CIFAR_TEST, *(m for m, _ in _CIFAR_META.values())]
            return _source_cached("cifar-dir", cand, tuple((n, *_size_mtime(cand / n)) for n in names if (cand / n).is_file()))
    files, dirs = _scan_dir(p)
    rows = tuple((f, *_size_mtime(p / f)) if _is_image(f) else (f, -1, -1) for f in files)
    return _source_cached("dir", p, (rows, tuple(sorted(dirs))))


def _size_mtime(f: Path) -> tuple[int, int]:
    s = f.stat()
    return s.st_size, s.st_mtime_ns


def clear_cache() -> None:
    """Forget every decoded dataset held in this process."""
    _source_cached.cache_clear()
