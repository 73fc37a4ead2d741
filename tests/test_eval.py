"""Evaluation data (ImageFolder dirs and tars, CIFAR python batches) and ``evaluate``.

The shared assets (``../shared/assets`` next to the repository) are always present in CI; nothing
here is skipped.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from zsq.data import eval as ev
from zsq.data.eval import evaluate, load_images, open_dataset
from zsq.errors import BadValueError, DataError, ZsqError
from zsq.models.preprocess import CIFAR10, Preprocess

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def assets(monkeypatch) -> Path:
    """The shared model/data cache, set as ZSQ_HOME (read-only), with downloads forbidden."""
    home = SHARED / "assets"
    assert (home / "cifar10-jpeg" / "test.tar").is_file(), f"shared assets missing at {home}"
    monkeypatch.setenv("ZSQ_HOME", str(home))
    monkeypatch.setenv("ZSQ_OFFLINE", "1")
    return home


# --------------------------------------------------------------------------------------------------
# helpers


def _rand_image(rng: np.random.Generator, size=(12, 10), mode="RGB") -> Image.Image:
    h, w = size
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _make_tree(root: Path, counts=(3, 5, 2), size=(12, 10), seed=0) -> list[str]:
    """ROOT/<class>/<image> with JPEG, PNG and a grayscale PNG; returns the class names."""
    rng = np.random.default_rng(seed)
    classes = ["cat", "dog", "emu"][: len(counts)]
    for c, n in zip(classes, counts):
        d = root / c
        d.mkdir(parents=True)
        for k in range(n):
            if k % 3 == 0:
                _rand_image(rng, size).save(d / f"{k:03d}.jpg", quality=90)
            elif k % 3 == 1:
                _rand_image(rng, size).save(d / f"{k:03d}.png")
            else:
                _rand_image(rng, size, "L").save(d / f"{k:03d}.png")
    return classes


def _tar(src_dir: Path, out: Path, arcname: str, mode: str = "w") -> Path:
    with tarfile.open(out, mode) as tf:
        tf.add(src_dir, arcname=arcname)
    return out


def _reference(root: Path, pre: Preprocess) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Independent ImageFolder reading: PIL + Preprocess.transform per image."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    tf = pre.transform()
    xs, ys, names = [], [], []
    for label, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            xs.append(tf(Image.open(f).convert("RGB")))
            ys.append(label)
            names.append(f"{c}/{f.name}")
    return torch.stack(xs), torch.tensor(ys), names


def _all(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*ds.batches(4))
    return torch.cat(xs), torch.cat(ys)


class _Constant(nn.Module):
    """Always predicts the class order ``ranking`` (first = top-1)."""

    def __init__(self, ranking: list[int], num_classes: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        scores = torch.zeros(num_classes)
        for k, c in enumerate(ranking):
            scores[c] = num_classes - k
        self.register_buffer("scores", scores)

    def forward(self, x):
        return self.scores.expand(len(x), -1) + 0 * self.w


# --------------------------------------------------------------------------------------------------
# the published FP figure and the smoke subset on the real assets


def test_resnet20_full_jpeg_cifar10_top1_is_published_figure(assets):
    from zsq.models import load_model

    model = load_model("cifar10_resnet20")
    model.train()  # evaluate must switch to eval mode itself, and restore the mode afterwards
    res = evaluate(model, assets / "cifar10-jpeg" / "test.tar", progress=False)
    assert res["n"] == 10000
    assert round(res["top1"], 2) == 81.03
    assert 81.03 <= res["top5"] <= 100.0 and res["top5"] > 95.0
    assert model.training
    # the smoke subset through the same cached decode
    small = evaluate(model, assets / "cifar10-jpeg" / "test.tar", limit=1000, progress=False)
    assert small["n"] == 1000
    assert 70.0 < small["top1"] < 90.0


def test_limit_1000_is_first_100_per_class_in_sorted_member_order(assets):
    path = assets / "cifar10-jpeg" / "test.tar"
    ds = open_dataset(path, CIFAR10, limit=1000)
    assert ds.classes == CIFAR_CLASSES
    assert len(ds) == 1000
    assert torch.bincount(ds.labels).tolist() == [100] * 10
    # independent reading of the member list
    with tarfile.open(path) as tf:
        members = sorted(m.name for m in tf.getmembers() if m.isfile())
    expected = [n for c in CIFAR_CLASSES for n in [m for m in members if m.split("/")[1] == c][:100]]
    assert ds.names == expected
    assert ds.names[0] == "test/airplane/0000.jpg" and ds.names[-1] == "test/truck/0099.jpg"
    assert ds.labels.tolist() == [k for k in range(10) for _ in range(100)]
    # a few tensors against an independent decode + torchvision transform
    tf_ = CIFAR10.transform()
    with tarfile.open(path) as tf:
        for i in (0, 99, 100, 555, 999):
            img = Image.open(io.BytesIO(tf.extractfile(ds.names[i]).read())).convert("RGB")
            x, y = ds[i]
            assert torch.equal(x, tf_(img)), ds.names[i]
            assert y == i // 100
    # limit not a multiple of the class count: floor(limit / classes) per class
    assert len(open_dataset(path, CIFAR10, limit=1005)) == 1000
    assert len(open_dataset(path, CIFAR10, limit=10)) == 10


def test_imagenet_sample_tar_uses_per_image_transform(assets):
    pre = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, resize=256, crop=224, interpolation="bicubic", input_size=224)
    path = assets / "imagenet-sample" / "val256.tar"
    ds = open_dataset(path, pre, limit=1000)
    assert len(ds) == 1000 and ds.num_classes == 1000
    assert ds.classes == sorted(ds.classes) and ds.classes[0] == "n01440764"
    assert ds.labels.tolist() == list(range(1000))
    x, y = ds[3]
    with tarfile.open(path) as tf:
        img = Image.open(io.BytesIO(tf.extractfile(ds.names[3]).read())).convert("RGB")
    assert torch.equal(x, pre.transform()(img)) and y == 3
    assert x.shape == (3, 224, 224)


# --------------------------------------------------------------------------------------------------
# layouts: directory, directory holding one ImageFolder, tar, tar.gz


@pytest.mark.parametrize(
    "pre",
    [CIFAR10, Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3, crop=8), Preprocess(resize=16, crop=14)],
    ids=["normalize", "crop", "resize"],
)
def test_directory_and_tar_layouts_give_identical_tensors(tmp_path, pre):
    classes = _make_tree(tmp_path / "x" / "val")
    ref_x, ref_y, ref_names = _reference(tmp_path / "x" / "val", pre)
    plain = _tar(tmp_path / "x" / "val", tmp_path / "val.tar", "val")
    gz = _tar(tmp_path / "x" / "val", tmp_path / "val.tar.gz", "val", "w:gz")
    flat = _tar(tmp_path / "x" / "val", tmp_path / "flat.tar", ".")  # ./<class>/<image>
    for path, prefix in [
        (tmp_path / "x" / "val", ""),  # the ImageFolder itself
        (tmp_path / "x", "val/"),  # a directory holding exactly one ImageFolder
        (plain, "val/"),
        (gz, "val/"),
        (flat, ""),
    ]:
        ds = open_dataset(path, pre)
        assert ds.classes == classes, path
        assert ds.names == [prefix + n for n in ref_names], path
        x, y = _all(ds)
        assert torch.equal(y, ref_y), path
        torch.testing.assert_close(x, ref_x, rtol=0, atol=0, msg=f"{path}")
        # item access agrees with batch access
        xi, yi = ds[len(ds) - 1]
        assert torch.equal(xi, x[-1]) and yi == int(y[-1])


def test_small_images_of_mixed_sizes_fall_back_to_per_image_transform(tmp_path):
    _make_tree(tmp_path / "a", counts=(2, 2), size=(10, 10))
    _make_tree(tmp_path / "b", counts=(0, 0, 2), size=(12, 9), seed=1)
    (tmp_path / "b" / "emu").rename(tmp_path / "a" / "emu")
    pre = Preprocess(crop=8)
    ref_x, ref_y, _ = _reference(tmp_path / "a", pre)
    x, y = _all(open_dataset(tmp_path / "a", pre))
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    # without a crop, batches holding two sizes cannot be stacked: one-line error
    ds = open_dataset(tmp_path / "a", CIFAR10)
    assert [tuple(x.shape) for x, _ in ds.batches(4)] == [(4, 3, 10, 10), (2, 3, 12, 9)]
    with pytest.raises(DataError, match="different sizes") as e:
        ds.tensors()
    _one_line(e)


def test_images_first_decoded_under_inference_mode_still_load_for_calibration(tmp_path):
    # evaluation decodes (and caches) a subset under inference_mode; real calibration images taken
    # later from the same file, outside it, must decode the rest into the same cache
    _make_tree(tmp_path / "v", counts=(4, 4), size=(8, 8))
    tar = _tar(tmp_path / "v", tmp_path / "v.tar", "v")
    with torch.inference_mode():
        _all(open_dataset(tar, CIFAR10, limit=2))
    x, y = load_images(tar, CIFAR10, 8, seed=0)
    assert x.shape == (8, 3, 8, 8) and not torch.is_inference(x)
    ref_x, _ = _all(open_dataset(tar, CIFAR10))
    assert sorted(map(tuple, x.flatten(1).tolist())) == sorted(map(tuple, ref_x.flatten(1).tolist()))


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    _make_tree(tmp_path / "d")
    (tmp_path / "d" / "README.txt").write_text("notes")
    (tmp_path / "d" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "d" / "cat" / "labels.csv").write_text("a,b")
    (tmp_path / "d" / ".cache").mkdir()
    ds = open_dataset(tmp_path / "d", CIFAR10)
    assert ds.classes == ["cat", "dog", "emu"] and len(ds) == 10


def test_decoded_cache_is_reused_and_invalidated_by_changes(tmp_path):
    _make_tree(tmp_path / "d", counts=(2, 2))
    a = open_dataset(tmp_path / "d", CIFAR10)
    b = open_dataset(tmp_path / "d", CIFAR10, limit=2)
    assert a._src is b._src  # same decoded images
    x0 = _all(a)[0]
    img = tmp_path / "d" / "cat" / "000.jpg"
    Image.new("RGB", (10, 12), (255, 0, 0)).save(img)
    os.utime(img, ns=(1, 1))  # a different mtime for sure
    c = open_dataset(tmp_path / "d", CIFAR10)
    assert c._src is not a._src
    x1 = _all(c)[0]
    assert not torch.equal(x0[0], x1[0]) and torch.equal(x0[1:], x1[1:])


# --------------------------------------------------------------------------------------------------
# CIFAR python batches


def _cifar_batch(n_per_class=3, protocol=4, seed=0) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.permutation(np.repeat(np.arange(10), n_per_class))]
    data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    d = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(d, protocol=protocol), data, labels


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_batches(tmp_path, protocol):
    raw, data, labels = _cifar_batch(protocol=protocol)
    d = tmp_path / "x" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "test_batch").write_bytes(raw)
    (d / "data_batch_1").write_bytes(_cifar_batch(protocol=protocol, seed=1)[0])
    meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    gz = _tar(d, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", "w:gz")

    order = sorted(range(len(labels)), key=lambda i: (labels[i], i))  # class-major, batch order inside
    pix = torch.from_numpy(data).reshape(-1, 3, 32, 32)[order]
    mean = torch.tensor(CIFAR10.mean).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10.std).view(1, 3, 1, 1)
    want_x = (pix.float() / 255 - mean) / std
    for path in (d, tmp_path / "x", gz, d / "test_batch"):
        ds = open_dataset(path, CIFAR10)
        assert ds.classes == CIFAR_CLASSES
        assert ds.names == [f"img_{i}.png" for i in order]
        x, y = _all(ds)
        assert y.tolist() == [labels[i] for i in order]
        torch.testing.assert_close(x, want_x, rtol=0, atol=1e-6)
        # per-image transform path (resize) sees the same pixels
        xr, _ = open_dataset(path, Preprocess(resize=32))[0]
        torch.testing.assert_close(xr, want_x[0], rtol=0, atol=1e-6)
    # the smoke-subset rule holds for batches too
    sub = open_dataset(d, CIFAR10, limit=20)
    assert torch.bincount(sub.labels).tolist() == [2] * 10
    assert sub.names == [f"img_{i}" + ".png" for i in order if order.index(i) % 3 < 2]


def test_cifar_pickle_refuses_arbitrary_objects(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle"):
        open_dataset(d, CIFAR10)
    assert not marker.exists()
    # bytes written through _codecs.encode with a codec other than latin1 are refused too
    payload = b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00xX\x04\x00\x00\x00zlibq\x01\x86q\x02Rq\x03."
    (d / "test_batch").write_bytes(payload)
    with pytest.raises(DataError, match="refusing"):
        open_dataset(d, CIFAR10)


def test_cifar_batch_with_wrong_content_is_a_data_error(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match="not a CIFAR batch"):
        open_dataset(d, CIFAR10)
    (d / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="cannot read CIFAR batch"):
        open_dataset(d, CIFAR10)


# --------------------------------------------------------------------------------------------------
# load_images (real-data calibration)


def test_load_images_balanced_and_deterministic(assets):
    path = assets / "cifar10-jpeg" / "test.tar"
    x, y = load_images(path, CIFAR10, 25, seed=0)
    assert x.shape == (25, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=10)
    assert int(counts.max()) - int(counts.min()) <= 1 and int(counts.sum()) == 25
    x2, y2 = load_images(path, CIFAR10, 25, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = load_images(path, CIFAR10, 25, seed=1)
    assert not torch.equal(x, x3)
    # fewer images than classes: one image from each of n distinct classes
    _, y4 = load_images(path, CIFAR10, 7, seed=3)
    assert len(set(y4.tolist())) == 7


def test_load_images_from_small_tree_matches_reference(tmp_path):
    _make_tree(tmp_path / "t", counts=(3, 5, 2))
    ref_x, ref_y, _ = _reference(tmp_path / "t", CIFAR10)
    x, y = load_images(tmp_path / "t", CIFAR10, 10, seed=5)  # everything, in a seeded order
    assert sorted(y.tolist()) == sorted(ref_y.tolist())
    assert torch.bincount(y[:6]).tolist() == [2, 2, 2]  # round-robin: any prefix is balanced
    for xi, yi in zip(x, y):  # every returned image is one of the reference images of its class
        assert any(torch.equal(xi, r) for r in ref_x[ref_y == yi])
    with pytest.raises(BadValueError, match="exceeds the 10 images"):
        load_images(tmp_path / "t", CIFAR10, 11)
    for bad in (0, -3, 2.5):
        with pytest.raises(BadValueError, match="--calib-n"):
            load_images(tmp_path / "t", CIFAR10, bad)


# --------------------------------------------------------------------------------------------------
# evaluate on a known model


def test_evaluate_counts_top1_and_top5_exactly(tmp_path):
    _make_tree(tmp_path / "t", counts=(3, 5, 2))  # labels: 3 x cat, 5 x dog, 2 x emu
    model = _Constant([1, 2, 0, 3, 4, 5, 6], num_classes=7)  # always "dog", then "emu", then "cat"
    res = evaluate(model, tmp_path / "t", progress=False, preprocess=CIFAR10)
    assert res == {"top1": 50.0, "top5": 100.0, "n": 10}
    model = _Constant([6, 5, 4, 3, 1, 0, 2], num_classes=7)  # dog 5th, cat 6th, emu 7th
    res = evaluate(model, open_dataset(tmp_path / "t", CIFAR10), batch_size=2, progress=True)  # bar shown
    assert res == {"top1": 0.0, "top5": 50.0, "n": 10}
    # limit on a Dataset: first limit // classes per class
    res = evaluate(model, open_dataset(tmp_path / "t", CIFAR10), limit=6, progress=False)
    assert res["n"] == 6 and res["top5"] == pytest.approx(100 * 2 / 6)
    # the preprocessing of the model's record is used when the data is a path
    from zsq.models import load_model

    m = load_model(_Constant([0, 1, 2], 3), preprocess=CIFAR10, num_classes=3)
    assert evaluate(m, tmp_path / "t", progress=False)["top1"] == 30.0


def test_evaluate_refuses_model_with_fewer_outputs_than_classes(tmp_path):
    _make_tree(tmp_path / "t", counts=(1, 1, 1))
    with pytest.raises(DataError, match="3 classes but the model predicts 2"):
        evaluate(_Constant([0, 1], 2), tmp_path / "t", preprocess=CIFAR10, progress=False)


# --------------------------------------------------------------------------------------------------
# errors: one line, a ZsqError subclass, naming the problem


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, ZsqError) and "\n" not in msg and msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        open_dataset(tmp_path / "nope", CIFAR10)
    _one_line(e)


def test_not_imagefolder_layout(tmp_path):
    d = tmp_path / "loose"
    d.mkdir()
    _rand_image(np.random.default_rng(0)).save(d / "a.png")
    _rand_image(np.random.default_rng(1)).save(d / "b.png")
    with pytest.raises(DataError, match="not in ImageFolder layout") as e:
        open_dataset(d, CIFAR10)
    _one_line(e)
    # class folders with no images in them
    d2 = tmp_path / "noimg"
    (d2 / "cat").mkdir(parents=True)
    (d2 / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no image files") as e:
        open_dataset(d2, CIFAR10)
    _one_line(e)
    # a tar of loose images
    t = tmp_path / "loose.tar"
    with tarfile.open(t, "w") as tf:
        tf.add(d / "a.png", arcname="a.png")
    with pytest.raises(DataError, match="not in ImageFolder layout"):
        open_dataset(t, CIFAR10)


def test_empty_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty") as e:
        open_dataset(tmp_path / "empty", CIFAR10)
    _one_line(e)
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        open_dataset(tmp_path / "empty.tar", CIFAR10)
    with tarfile.open(tmp_path / "nothing.tar", "w"):
        pass
    with pytest.raises(DataError):
        open_dataset(tmp_path / "nothing.tar", CIFAR10)
    dirs_only = tmp_path / "dirs.tar"
    (tmp_path / "skeleton" / "cat").mkdir(parents=True)
    _tar(tmp_path / "skeleton", dirs_only, "skeleton")
    with pytest.raises(DataError, match="no image files"):
        open_dataset(dirs_only, CIFAR10)


def test_unreadable_tar(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(DataError, match="cannot read tar") as e:
        open_dataset(bad, CIFAR10)
    _one_line(e)
    _make_tree(tmp_path / "t", counts=(20, 20), size=(16, 16))
    gz = _tar(tmp_path / "t", tmp_path / "t.tar.gz", "t", "w:gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot read tar") as e:
        open_dataset(cut, CIFAR10)
    _one_line(e)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match="neither a tar archive"):
        open_dataset(other, CIFAR10)


def test_undecodable_image_is_named(tmp_path):
    _make_tree(tmp_path / "t", counts=(2, 2))
    (tmp_path / "t" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg") as e:
        _all(open_dataset(tmp_path / "t", CIFAR10))
    _one_line(e)
    tar = _tar(tmp_path / "t", tmp_path / "t.tar", "t")
    with pytest.raises(DataError, match="t/dog/broken.jpg"):
        evaluate(_Constant([0, 1], 2), tar, preprocess=CIFAR10, progress=False)
    with pytest.raises(DataError, match="broken.jpg"):  # per-image path too
        _all(open_dataset(tar, Preprocess(resize=8)))


@pytest.mark.parametrize("limit", [0, -10, 2, 9])
def test_bad_limit(assets, limit):
    with pytest.raises(BadValueError, match="--eval-limit") as e:
        open_dataset(assets / "cifar10-jpeg" / "test.tar", CIFAR10, limit=limit)
    _one_line(e)


def test_bad_limit_in_evaluate(tmp_path):
    _make_tree(tmp_path / "t")
    with pytest.raises(BadValueError, match="below the 3 classes"):
        evaluate(_Constant([0], 3), tmp_path / "t", preprocess=CIFAR10, limit=2, progress=False)
    with pytest.raises(BadValueError, match="positive"):
        evaluate(_Constant([0], 3), open_dataset(tmp_path / "t", CIFAR10), limit=0, progress=False)


def test_clear_cache_forgets_decoded_sets(tmp_path):
    _make_tree(tmp_path / "t", counts=(1, 1))
    a = open_dataset(tmp_path / "t", CIFAR10)
    ev.clear_cache()
    assert open_dataset(tmp_path / "t", CIFAR10)._src is not a._src
