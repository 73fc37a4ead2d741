"""Evaluation and real-calibration data: ImageFolder directories and tars, CIFAR python batches.

Accepted ``path`` forms (labels are the index of the class folder in sorted order, as in
``torchvision.datasets.ImageFolder``):

* a directory ``ROOT/<class>/<image>`` (images may sit in nested folders below the class folder),
  or a directory holding exactly one such ``ROOT`` (``x/test/<class>/...``);
* a ``.tar`` / ``.tar.gz`` of such a tree, read member by member with :mod:`tarfile`, never extracted;
* CIFAR-10/100 python batches: a ``cifar-10-batches-py`` (``cifar-100-python``) directory, the
  ``cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``) archive, or one batch file. The pickles
  are read with an unpickler that only builds numpy arrays (no arbitrary objects).

Speed: small images (CIFAR-sized, at most 96x96) are decoded once into a uint8 tensor that stays
cached in this process (keyed by the file's resolved path, size and mtime); normalization and centre
cropping then run as tensor ops on whole batches. Larger images, or presets with a resize, go
through :meth:`Preprocess.transform` image by image.

Public functions: :func:`open_dataset`, :func:`load_images`, :func:`evaluate`.
"""

from __future__ import annotations

import functools
import io
import operator
import os
import pickle
import re
import tarfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import BadValueError, DataError, ZsqError
from ..models.preprocess import Preprocess
from ..progress import counting
from ..record import model_info

__all__ = ["ImageSet", "open_dataset", "load_images", "evaluate", "clear_cache"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SMALL_PIXELS = 96 * 96  # images up to this many pixels are decoded once into a uint8 cache
LOAD_BATCH = 256  # real calibration images are decoded (and counted) this many at a time
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

    # --- raw access ---------------------------------------------------------------------------
    def read(self, i: int) -> bytes:  # encoded image bytes
        raise NotImplementedError

    def image(self, i: int):
        """Image ``i`` as an RGB PIL image."""
        from PIL import Image

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


def _open_tar_stream(path: Path) -> _Source:
    blobs: dict[str, bytes] = {}
    dirs: set[str] = set()
    files: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            name = _norm(m.name)
            if m.isdir():
                dirs.add(name)
            elif m.isfile():
                files[name] = m
                base = PurePosixPath(name).name
                if _is_image(name) or base in _CIFAR_TEST or base in ("batches.meta", "meta"):
                    blobs[name] = tf.extractfile(m).read()
    cifar = _cifar_in_members(path, {k: v for k, v in files.items() if k in blobs}, lambda m: blobs[_norm(m.name)])
    if cifar is not None:
        return cifar
    _, classes, out = _layout(path, list(files), dirs)
    return _TarSource(path, classes, out, blobs=[blobs[f] for f, _ in out])


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


# --------------------------------------------------------------------------------------------------
# Datasets


def _normalize(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, exactly what ``ToTensor`` + ``Normalize`` give per image."""
    if pre.crop:
        from torchvision.transforms import functional as F  # same offsets/padding as the PIL transform

        x = F.center_crop(x, [pre.crop, pre.crop])
    x = x.to(torch.float32).div_(255)
    mean = torch.as_tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _collate(items):
    xs, ys = zip(*items)
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(
            f"images have different sizes after preprocessing ({', '.join(map(str, sorted(shapes)[:3]))}): "
            "give the model a --crop size"
        )
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


class ImageSet(Dataset):
    """A labelled image set from one path: items are ``(normalized float tensor (3, H, W), label)``.

    ``classes`` (sorted folder names), ``names`` (member names, in item order), ``labels`` (int64)
    and ``path`` describe it. :meth:`batches` yields normalized batches; for small images the
    normalization runs on whole uint8 batches instead of image by image.
    """

    def __init__(self, source: _Source, index: torch.Tensor, preprocess: Preprocess):
        self._src, self.index, self.preprocess = source, index, preprocess
        self.path = source.path
        self.classes = list(source.classes)
        self.labels = source.labels[index]
        self.names = [source.names[i] for i in index.tolist()]
        self._transform = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.index)

    def _fast(self) -> bool:
        return self.preprocess.resize is None and self._src.small

    def _tf(self):
        if self._transform is None:
            self._transform = self.preprocess.transform()
        return self._transform

    def __getitem__(self, i: int):
        j = int(self.index[i])
        if self._fast():
            px = self._src.pixels(self.index[i : i + 1])
            if px is not None:
                return _normalize(px, self.preprocess)[0], int(self.labels[i])
        return self._tf()(self._src.image(j)), int(self.labels[i])

    def uint8(self, items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Raw ``(uint8 [N, 3, H, W], int64 [N])`` of the items ``items`` (positions in this set; all by
        default), before any preprocessing, or None when the images are not small ones of one size
        (the whole source is decoded once into a shared uint8 cache). For training-style pipelines
        that augment on uint8 batches (bench/train_vit.py)."""
        index = self.index if items is None else self.index[items]
        px = self._src.pixels(index)
        return None if px is None else (px, self._src.labels[index].clone())

    def batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalized ``(images, labels)`` batches in item order. Small images are decoded batch by
        batch (each missing image once, into the source's cache), so a consumer's progress moves
        while they decode; where they turn out to differ in size, the rest go image by image."""
        start = 0
        if self._fast():
            for start in range(0, len(self), batch_size):
                px = self._src.pixels(self.index[start : start + batch_size])
                if px is None:  # mixed sizes: the remaining items take the per-image transform
                    break
                yield _normalize(px, self.preprocess), self.labels[start : start + batch_size]
            else:
                return
        rest = self if start == 0 else torch.utils.data.Subset(self, range(start, len(self)))
        yield from DataLoader(rest, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=_collate)

    def tensors(self, batch_size: int | None = None, advance=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All items as one ``(images, labels)`` pair, gathered ``batch_size`` items at a time (all at
        once by default); ``advance(k)`` is called after every batch of ``k`` items."""
        x = y = None
        for x_b, y_b in self.batches(batch_size or max(len(self), 1)):
            if x is None:
                x = torch.empty((len(self), *x_b.shape[1:]), dtype=x_b.dtype)
                y, at = torch.empty(len(self), dtype=torch.int64), 0
            elif x_b.shape[1:] != x.shape[1:]:
                raise DataError(f"images have different sizes after preprocessing ({tuple(x.shape[1:])}, "
                                f"{tuple(x_b.shape[1:])}): give the model a --crop size")
            x[at : at + len(x_b)], y[at : at + len(x_b)] = x_b, y_b
            at += len(x_b)
            if advance is not None:
                advance(len(x_b))
        if x is None:
            raise DataError(f"{self.path}: no images selected")
        return x, y


def _class_rank(labels: torch.Tensor) -> torch.Tensor:
    """Position of every item among the items of its class, counted in item order."""
    order = torch.sort(labels, stable=True).indices
    grouped = labels[order]
    counts = torch.bincount(grouped)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - starts[grouped]
    return rank


def _positive_int(value, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise BadValueError(f"{what} must be a positive integer, got {value!r}") from None
    if v <= 0:
        raise BadValueError(f"{what} must be a positive integer, got {v}")
    return v


def _first_per_class(index: torch.Tensor, labels: torch.Tensor, num_classes: int, limit) -> torch.Tensor:
    """The items of ``index`` that are among the first ``limit // num_classes`` of their class."""
    limit = _positive_int(limit, "--eval-limit")
    if limit < num_classes:
        raise BadValueError(
            f"--eval-limit {limit} is below the {num_classes} classes: the subset takes limit/{num_classes} "
            "images per class, so use a multiple of the class count"
        )
    return index[_class_rank(labels) < limit // num_classes]


def open_dataset(path: str | os.PathLike, preprocess: Preprocess | None = None, limit: int | None = None) -> ImageSet:
    """The labelled images at ``path`` (see the module docstring for accepted forms).

    ``limit=N`` selects the fixed subset "first ``N // num_classes`` images of every class" in
    sorted member order (``limit=1000`` on CIFAR-10: the first 100 per class, the smoke subset).
    """
    src = _source(path)
    pre = preprocess or Preprocess()
    index = torch.arange(len(src))
    if limit is not None:
        index = _first_per_class(index, src.labels, len(src.classes), limit)
    return ImageSet(src, index, pre)


def load_images(
    path: str | os.PathLike, preprocess: Preprocess | None, n: int, seed: int = 0, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real images for calibration, balanced over classes, deterministic for ``seed``.

    Classes are visited round-robin in a seeded random order, each yielding its images in a seeded
    random order, so class counts differ by at most one (``n`` below the class count takes one image
    from each of ``n`` random classes). Returns ``(float images (n, 3, H, W), int64 labels (n,))``.
    ``progress``: count the decoded images on stderr (:func:`zsq.progress.counting`).
    """
    src = _source(path)
    n = _positive_int(n, "--calib-n")
    if n > len(src):
        raise BadValueError(f"--calib-n {n} exceeds the {len(src)} images in {path}")
    g = torch.Generator().manual_seed(seed)
    labels = src.labels
    members = [torch.nonzero(labels == c).flatten() for c in range(len(src.classes))]
    members = [m[torch.randperm(len(m), generator=g)] for m in members]
    order = torch.randperm(len(members), generator=g).tolist()
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for c in order:
            if depth < len(members[c]):
                picked.append(int(members[c][depth]))
                if len(picked) == n:
                    break
        depth += 1
    ds = ImageSet(src, torch.tensor(picked, dtype=torch.int64), preprocess or Preprocess())
    with counting(progress, f"loading {n} images from {Path(path).name}", n) as advance:
        return ds.tensors(batch_size=LOAD_BATCH, advance=advance)


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    model: torch.nn.Module,
    data: str | os.PathLike | Dataset,
    *,
    batch_size: int = 256,
    limit: int | None = None,
    progress: bool = True,
    preprocess: Preprocess | None = None,
) -> dict:
    """Top-1 / top-5 accuracy (percent, unrounded) of ``model`` on ``data``: ``{top1, top5, n}``.

    ``data`` is a path (opened with the preprocessing of the model's record,
    ``zsq.record.model_info(model).preprocess``, or ``preprocess``) or a
    Dataset of ``(image, label)``. ``limit`` takes the first ``limit // num_classes`` images per
    class (for a foreign Dataset: its first ``limit`` items). Runs in eval mode under
    ``torch.inference_mode``; the model's train/eval mode is restored afterwards.
    """
    batch_size = _positive_int(batch_size, "batch size")
    if isinstance(data, Dataset):
        ds: Dataset = data
        if isinstance(ds, ImageSet) and limit is not None:
            ds = ImageSet(ds._src, _first_per_class(ds.index, ds.labels, ds.num_classes, limit), ds.preprocess)
        elif limit is not None:
            limit = _positive_int(limit, "--eval-limit")
            ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))  # type: ignore[arg-type]
    else:
        pre = preprocess or getattr(model_info(model), "preprocess", None)
        if pre is None:
            raise ZsqError("the model carries no preprocessing: load it with zsq.load_model or pass preprocess=")
        ds = open_dataset(data, pre, limit=limit)
    n_items = len(ds)  # type: ignore[arg-type]
    if n_items == 0:
        raise DataError("the evaluation set is empty")
    batches = (
        ds.batches(batch_size)
        if isinstance(ds, ImageSet)
        else DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    )
    n_dataset_classes = ds.num_classes if isinstance(ds, ImageSet) else None
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    correct1 = correct5 = seen = 0
    was_training = model.training
    model.eval()
    try:
        what = f"eval {Path(ds.path).name}" if isinstance(ds, ImageSet) else "eval"
        if getattr(model, "eval_label", None):  # e.g. "onnxruntime" for an exported model
            what += f" ({model.eval_label})"
        with torch.inference_mode(), counting(progress, what, n_items) as advance:
            for x, y in batches:
                x, y = x.to(device), torch.as_tensor(y).to(device)
                out = model(x)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if n_dataset_classes is not None and out.shape[1] < n_dataset_classes:
                    raise DataError(
                        f"the eval data has {n_dataset_classes} classes but the model predicts {out.shape[1]}: "
                        "wrong dataset for this model?"
                    )
                top = out.topk(min(5, out.shape[1]), dim=1).indices
                hit = top == y[:, None]
                correct1 += int(hit[:, 0].sum())
                correct5 += int(hit.any(dim=1).sum())
                seen += len(y)
                advance(len(y))
    finally:
        model.train(was_training)
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "n": seen}
