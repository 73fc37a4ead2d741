"""Evaluation of ImageNet-style sets (issue 36 item 2): a folder with one sub-folder per class, its tar and
its compressed tar read as a stream (never the whole set in memory), loader workers, top-1 and top-5;
the same numbers from every form and every worker count, checked against a plain image-by-image loop."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from zsq.data import eval as ev, sources
from zsq.errors import BadValueError, DataError
from zsq.models.preprocess import Preprocess

VAL256 = Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-sample" / "val256.tar"
PRE = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=72, crop=64, interpolation="bicubic",
                 input_size=64)
N_CLASSES = 6


@pytest.fixture(scope="module")
def imagenet_style(tmp_path_factory):
    """The first 6 classes of val256.tar as ``val/<wnid>/<image>`` (a folder, a tar and a .tar.gz), with
    two copies of each image (one flipped) so that every class holds two images."""
    if not VAL256.is_file():
        pytest.skip(f"{VAL256} is not here (the shared ImageNet sample)")
    root = tmp_path_factory.mktemp("inet")
    folder = root / "val"
    with tarfile.open(VAL256) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name)[:N_CLASSES]
        for m in members:
            wnid, name = m.name.split("/")[-2:]
            (folder / wnid).mkdir(parents=True)
            data = tf.extractfile(m).read()
            (folder / wnid / name).write_bytes(data)
            im = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT)
            im.save(folder / wnid / ("z_" + name), quality=90)
    for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz")):
        with tarfile.open(root / f"val{suffix}", mode) as tf:
            tf.add(folder, arcname="val")
    return root


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, N_CLASSES)).eval()


def _reference(model, folder: Path) -> dict:
    """Top-1 / top-5 by hand: every image opened with PIL, transformed and classified on its own."""
    tf = PRE.transform()
    hit1 = hit5 = n = 0
    for label, cls in enumerate(sorted(p.name for p in folder.iterdir())):
        for f in sorted((folder / cls).iterdir()):
            with torch.inference_mode():
                out = model(tf(Image.open(f).convert("RGB"))[None])[0]
            top = out.topk(5).indices.tolist()
            hit1 += top[0] == label
            hit5 += label in top
            n += 1
    return {"top1": 100.0 * hit1 / n, "top5": 100.0 * hit5 / n, "n": n}


def test_every_form_and_worker_count_gives_the_same_top1_top5(imagenet_style, monkeypatch):
    model = _model()
    want = _reference(model, imagenet_style / "val")
    assert want["n"] == 2 * N_CLASSES
    monkeypatch.setattr(sources, "BLOB_LIMIT", 0)  # the .tar.gz is streamed, as a large one would be
    ev.clear_cache()
    for form, workers in (("val", 0), ("val", 2), ("val.tar", 0), ("val.tar.gz", 0), ("val.tar.gz", 2)):
        r = ev.evaluate(model, imagenet_style / form, preprocess=PRE, batch_size=5, num_workers=workers,
                        progress=False)
        assert r == want, (form, workers, r, want)
    src = sources._source(imagenet_style / "val.tar.gz")
    assert src.sequential and not hasattr(src, "_blobs") and src._pixels is None  # nothing held
    assert not sources._source(imagenet_style / "val").sequential
    # the per-class subset, streamed
    r = ev.evaluate(model, imagenet_style / "val.tar.gz", preprocess=PRE, limit=N_CLASSES, num_workers=2,
                    progress=False)
    assert r["n"] == N_CLASSES
    assert r == ev.evaluate(model, imagenet_style / "val", preprocess=PRE, limit=N_CLASSES, progress=False)
    ev.clear_cache()


def test_streamed_tar_images_in_item_order(imagenet_style, monkeypatch):
    """Calibration images from a streamed .tar.gz: the same tensors, in the same order, as from the folder."""
    monkeypatch.setattr(sources, "BLOB_LIMIT", 0)
    ev.clear_cache()
    a = ev.load_images(imagenet_style / "val", PRE, 7, seed=3)
    b = ev.load_images(imagenet_style / "val.tar.gz", PRE, 7, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ds = ev.open_dataset(imagenet_style / "val.tar.gz", PRE)
    assert torch.equal(ds[3][0], ev.open_dataset(imagenet_style / "val", PRE)[3][0])  # random access: a pass
    ev.clear_cache()


def test_an_undecodable_image_in_a_worker_is_one_line(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for k in range(40):
            Image.new("RGB", (120, 100), (k, 0, 0)).save(tmp_path / cls / f"{k:02d}.png")
    (tmp_path / "dog" / "39.png").write_bytes(b"not an image")
    for workers in (0, 2):
        with pytest.raises(DataError) as e:
            ev.evaluate(_model(), tmp_path, preprocess=PRE, batch_size=16, num_workers=workers, progress=False)
        msg = str(e.value)
        assert msg.startswith(f"cannot decode image dog/39.png in {tmp_path}"), msg
        assert "\n" not in msg and "Traceback" not in msg
    ev.clear_cache()


def test_small_compressed_tar_is_held_as_before(imagenet_style):
    ev.clear_cache()
    src = sources._source(imagenet_style / "val.tar.gz")
    assert not src.sequential and src._blobs is not None
    ev.clear_cache()


def test_eval_workers_setting(monkeypatch):
    monkeypatch.setenv(ev.WORKERS_ENV, "3")
    assert ev.eval_workers(10) == 3
    monkeypatch.delenv(ev.WORKERS_ENV)
    assert ev.eval_workers(10) == 0  # a handful of images: not worth starting processes
    assert 0 <= ev.eval_workers(50_000) <= 8
    for bad in ("-1", "two"):
        monkeypatch.setenv(ev.WORKERS_ENV, bad)
        with pytest.raises(BadValueError, match=ev.WORKERS_ENV):
            ev.eval_workers(100)
    monkeypatch.setenv(ev.WORKERS_ENV, "0")
    with pytest.raises(BadValueError, match="num_workers"):
        ev.evaluate(_model(), torch.utils.data.TensorDataset(torch.zeros(2, 3, 8, 8), torch.zeros(2).long()),
                    num_workers=-1, progress=False)
