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
through :meth:`Preprocess.transform` image by image, read from the folder or tar as they are needed
(never the whole set decoded in memory), in DataLoader worker processes (:func:`eval_workers`). A
compressed tar is read front to back: its image bytes are held while they fit in
``sources.BLOB_LIMIT``, a larger one is streamed again for every pass over it (archive order).

Public functions: :func:`open_dataset`, :func:`load_images`, :func:`evaluate`.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import BadValueError, DataError, ZsqError
from ..models.preprocess import Preprocess
from ..progress import counting
from ..record import model_info
from .sources import (  # noqa: F401 - the readers of dataset files; these names stay importable from here
    CIFAR10_CLASSES, IMG_EXTENSIONS, SMALL_PIXELS, _Source, _source, clear_cache,
)

__all__ = ["ImageSet", "open_dataset", "load_images", "evaluate", "eval_workers", "clear_cache"]

LOAD_BATCH = 256  # real calibration images are decoded (and counted) this many at a time
WORKERS_ENV = "ZSQ_EVAL_WORKERS"  # loader worker processes for the image-by-image path (0: decode in-process)


def eval_workers(n_items: int) -> int:
    """DataLoader workers that decode and resize large images while the model runs: ``ZSQ_EVAL_WORKERS``
    when set, else one per CPU beyond the first (at most 8) for sets of 64 images or more, else 0."""
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            v = int(env)
        except ValueError:
            raise BadValueError(f"{WORKERS_ENV} must be a whole number >= 0, got '{env}'") from None
        if v < 0:
            raise BadValueError(f"{WORKERS_ENV} must be a whole number >= 0, got '{env}'")
        return v
    if n_items < 64:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


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
    xs, ys, *pos = zip(*items)
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(
            f"images have different sizes after preprocessing ({', '.join(map(str, sorted(shapes)[:3]))}): "
            "give the model a --crop size"
        )
    out = torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
    return (*out, torch.tensor(pos[0], dtype=torch.int64)) if pos else out


def _unwrapped(loader: DataLoader):
    """``loader``'s batches; a zsq error raised in a worker process comes back as the one-line error it
    was (DataLoader re-raises it with the worker's traceback folded into the message)."""
    try:
        yield from loader
    except ZsqError as e:
        msg = str(e)
        if loader.num_workers == 0 or "Original Traceback" not in msg:
            raise
        last = msg.rstrip().splitlines()[-1]
        head, sep, text = last.partition(": ")
        raise DataError(text if sep and head.endswith("Error") else last) from None


class _Stream(torch.utils.data.IterableDataset):
    """The items of an :class:`ImageSet` over a sequential source (a large compressed tar), read in one
    pass per worker (worker ``w`` of ``W`` keeps every ``W``-th wanted item): ``(image, label, position)``
    in archive order."""

    def __init__(self, ds: "ImageSet"):
        self.ds = ds

    def __iter__(self):
        ds = self.ds
        info = torch.utils.data.get_worker_info()
        where = {int(j): p for p, j in enumerate(ds.index.tolist())}
        wanted = sorted(where)
        if info is not None:
            wanted = wanted[info.id :: info.num_workers]
        tf = ds._tf()
        for j, data in ds._src.stream(wanted):
            p = where[j]
            yield tf(ds._src.image(j, data)), int(ds.labels[p]), p


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

    def batches(self, batch_size: int = 256, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalized ``(images, labels)`` batches in item order (archive order for a streamed compressed
        tar). Small images are decoded batch by batch (each missing image once, into the source's cache),
        so a consumer's progress moves while they decode; where they turn out to differ in size, the
        rest go image by image, in ``num_workers`` loader processes (0: in this one)."""
        for x, y, _ in self._batches(batch_size, num_workers):
            yield x, y

    def _batches(self, batch_size: int, num_workers: int = 0):
        """``(images, labels, positions or None)``: positions in this set where the order is the archive's."""
        if self._src.sequential:
            yield from _unwrapped(DataLoader(_Stream(self), batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=_collate))
            return
        start = 0
        if self._fast():
            for start in range(0, len(self), batch_size):
                px = self._src.pixels(self.index[start : start + batch_size])
                if px is None:  # mixed sizes: the remaining items take the per-image transform
                    break
                yield _normalize(px, self.preprocess), self.labels[start : start + batch_size], None
            else:
                return
        rest = self if start == 0 else torch.utils.data.Subset(self, range(start, len(self)))
        for x, y in _unwrapped(DataLoader(rest, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                          collate_fn=_collate)):
            yield x, y, None

    def tensors(self, batch_size: int | None = None, advance=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All items as one ``(images, labels)`` pair, gathered ``batch_size`` items at a time (all at
        once by default); ``advance(k)`` is called after every batch of ``k`` items."""
        x = y = None
        for x_b, y_b, pos in self._batches(batch_size or max(len(self), 1)):
            if x is None:
                x = torch.empty((len(self), *x_b.shape[1:]), dtype=x_b.dtype)
                y, at = torch.empty(len(self), dtype=torch.int64), 0
            elif x_b.shape[1:] != x.shape[1:]:
                raise DataError(f"images have different sizes after preprocessing ({tuple(x.shape[1:])}, "
                                f"{tuple(x_b.shape[1:])}): give the model a --crop size")
            if pos is None:
                x[at : at + len(x_b)], y[at : at + len(x_b)] = x_b, y_b
            else:  # a streamed tar yields archive order: back into item order
                x[pos], y[pos] = x_b, y_b
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


def calib_indices(labels: torch.Tensor, n_classes: int, n: int, seed: int = 0) -> list[int]:
    """The indices :func:`load_images` reads for ``n`` images at ``seed``: classes visited round-robin
    in a seeded random order, each yielding its images in a seeded random order (``n`` <= len(labels))."""
    g = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(labels == c).flatten() for c in range(n_classes)]
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
    return picked


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
    picked = calib_indices(src.labels, len(src.classes), n, seed)
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
    num_workers: int | None = None,
) -> dict:
    """Top-1 / top-5 accuracy (percent, unrounded) of ``model`` on ``data``: ``{top1, top5, n}``.

    ``data`` is a path (opened with the preprocessing of the model's record,
    ``zsq.record.model_info(model).preprocess``, or ``preprocess``) or a
    Dataset of ``(image, label)``. ``limit`` takes the first ``limit // num_classes`` images per
    class (for a foreign Dataset: its first ``limit`` items). Runs in eval mode under
    ``torch.inference_mode``; the model's train/eval mode is restored afterwards. ``num_workers``: loader
    processes that decode and resize images image by image (large images; :func:`eval_workers` by
    default, 0 for a foreign Dataset); small images are decoded in batches in this process.
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
    if num_workers is None:
        num_workers = eval_workers(n_items) if isinstance(ds, ImageSet) and not ds._fast() else 0
    elif isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise BadValueError(f"num_workers must be a whole number >= 0, got {num_workers!r}")
    batches = (
        ds.batches(batch_size, num_workers=num_workers)
        if isinstance(ds, ImageSet)
        else DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
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
