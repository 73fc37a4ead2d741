"""Augmented calibration sets for block reconstruction (zsq.data.augment, the ``augment`` hparam)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zsq.data.augment import augment_set, random_flip_shift
from zsq.errors import BadValueError
from zsq.record import record_of

TEST_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "cifar10-jpeg" / "test.tar"

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n=6, seed=0):
    return torch.randn(n, 3, 10, 12, generator=torch.Generator().manual_seed(seed))


def test_none_and_flip():
    x = _x()
    assert augment_set(x, "none") is x
    y = augment_set(x, "flip")
    assert y.shape == (12, 3, 10, 12)
    assert torch.equal(y[:6], x) and torch.equal(y[6:, ..., 0], x[..., -1])
    assert torch.equal(y[6:].flip(-1), x)


def test_flip_shift_is_a_mirrored_zero_padded_crop_of_each_image():
    x = _x()
    pad = 3
    y = augment_set(x, "flipshift", copies=2, pad=pad, seed=5)
    assert y.shape == (18, 3, 10, 12) and torch.equal(y[:6], x)  # originals first, unchanged
    for k in range(2):
        for i in range(6):
            out = y[6 * (k + 1) + i]
            # some (flip, dy, dx) of the zero-padded source gives exactly this copy
            hits = [(f, dy, dx) for f in (False, True) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                    if torch.equal(F.pad(x[i].flip(-1) if f else x[i], (pad,) * 4)[:, dy:dy + 10, dx:dx + 12], out)]
            assert hits, (k, i)
    # the copies differ from each other (random offsets per image and per copy)
    assert not torch.equal(y[6:12], y[12:18])


def test_flip_shift_draws_are_seeded_and_vary():
    x = _x(64)
    a = augment_set(x, "flipshift", seed=1)
    assert torch.equal(a, augment_set(x, "flipshift", seed=1))
    assert not torch.equal(a, augment_set(x, "flipshift", seed=2))
    g = torch.Generator().manual_seed(0)
    z = random_flip_shift(torch.ones(64, 1, 8, 8), g, 4)
    # zero padding shows up as zeros in most shifted copies; an all-ones copy means offset (4, 4)
    assert 0 < int((z.sum((1, 2, 3)) == 64).sum()) < 16
    flips = random_flip_shift(torch.arange(4.0).view(1, 1, 1, 4).repeat(200, 1, 1, 1), g, 0)
    n_flipped = int((flips[:, 0, 0, 0] == 3).sum())
    assert 60 < n_flipped < 140, n_flipped  # Bernoulli(1/2) over 200


@pytest.mark.parametrize("kw", [{"mode": "rotate"}, {"mode": "flipshift", "copies": 0},
                                {"mode": "flipshift", "pad": -1}])
def test_bad_settings_are_user_errors(kw):
    with pytest.raises(BadValueError):
        augment_set(_x(), **kw)


def test_reconstruction_runs_on_the_augmented_set(resnet20):
    import zsq

    q = zsq.quantize(resnet20, recipe="genie", w_bits=4, a_bits=4, budget="smoke", progress=False,
                     calib=str(TEST_TAR), calib_n=16, hparams={"iters": 4, "augment": "flipshift",
                                                               "augment_copies": 2})
    # the set it trained on: the 16 images and 2 augmented copies of each
    assert record_of(q).result["recipe"]["hparams"]["augment"] == "flipshift"
    assert record_of(q).methods["recon"]["n_images"] == 48
