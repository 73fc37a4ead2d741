"""The ViT synthesizers and recipes (issue 11): psaq-vit, psaq-vit-v2, smi, clamp-vit, calib-sparse.

The maths and plumbing tests run on a randomly initialised ``cifar10_vit_tiny``; the recipes' end-to-end
checks read the shared smoke runs (conftest ``smoke_qmodel``: W4A4 on the trained zoo model).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import zsq
from zsq.errors import BadValueError
from zsq.models.vit import VIT_TINY, VisionTransformer
from zsq.quant.modules import QuantMatMul
from zsq.synth import SYNTHESIZERS, SyntheticSet, batch_generator, synthesize
from zsq.synth.vit import (
    SMI, moved_patches, neighbour_mask, nonzero_patches, patch_contrastive_loss, patch_similarity_entropy,
)
from zsq.ptq.sparse import KeptPatches
from zsq.record import model_info, record_of

#: the registered recipes on the ViT protocol (each runs its own synthesizer)
METHODS = tuple(m["name"] for m in zsq.api.list_methods() if m["protocol"] == "vit-ptq")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return zsq.load_model(VisionTransformer(VIT_TINY))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------ losses
def _entropy_reference(feats: torch.Tensor, bandwidth: float, points: int) -> float:
    """PSAQ-ViT's patch-similarity entropy, one image and one KDE point at a time, in float64."""
    f = feats.double()
    b, n, _ = f.shape
    sims = [[[float(F.cosine_similarity(f[i, p], f[i, q], dim=0)) for q in range(n)] for p in range(n)]
            for i in range(b)]
    flat = [s for img in sims for row in img for s in row]
    lo, hi = min(flat), max(flat)  # over the whole batch, as generate_data.py's sims.min() / .max()
    xs = [lo + (hi - lo) * k / (points - 1) for k in range(points)]
    ents = []
    for i in range(b):
        samples = [s for row in sims[i] for s in row]
        pdf = [sum(math.exp(-(x - s) ** 2 / (2 * bandwidth ** 2)) for s in samples) / len(samples)
               / math.sqrt(2 * math.pi * bandwidth ** 2) for x in xs]
        g = [-(p + 1e-4) * math.log(p + 1e-4) for p in pdf]
        ents.append(sum((xs[k + 1] - xs[k]) * (g[k] + g[k + 1]) / 2 for k in range(points - 1)))
    return sum(ents) / b


@pytest.mark.parametrize("bandwidth", [0.01, 0.3])
def test_patch_similarity_entropy_matches_reference(bandwidth, one_thread):
    feats = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    h = patch_similarity_entropy(feats, bandwidth, 10)
    torch.testing.assert_close(h.double(), torch.tensor(_entropy_reference(feats.detach(), bandwidth, 10),
                                                        dtype=torch.float64), rtol=1e-4, atol=1e-5)
    h.backward()  # differentiable w.r.t. the features
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def test_patch_contrastive_loss(one_thread):
    near = neighbour_mask(3, 1)
    assert near.sum(1).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3] and not near.diagonal().any()
    # two flat regions (left columns / right column) of a 3 x 3 grid: every anchor's similar neighbours
    # are identical to it and the others orthogonal, so the loss is ~0; unstructured (64-d noise) patches
    # have no clear positives and score higher; a gradient step on them lowers the loss
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    flat = torch.stack([a, a, b] * 3).unsqueeze(0)
    noisy = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    before = patch_contrastive_loss(noisy, 3, 1, 0.1)
    assert patch_contrastive_loss(flat, 3, 1, 0.1) < 1e-3 < 0.2 < before
    before.backward()
    with torch.no_grad():
        assert patch_contrastive_loss(noisy - 0.5 * noisy.grad, 3, 1, 0.1) < before


# --------------------------------------------------------------------------------------------- SMI
def test_moved_patches_follow_the_content(one_thread):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([[0, 9, 63], [5, 17, 40]])
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 3, 64, 4, 4)
    for off_rows, off_cols, flip in ((4, -4, False), (8, 4, True), (-4, 0, True)):  # whole patches
        v = torch.roll(x, shifts=(off_rows, off_cols), dims=(2, 3))
        v = torch.flip(v, dims=(3,)) if flip else v
        moved = v.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 3, 64, 4, 4)
        new = moved_patches(keep, off_rows, off_cols, flip, 8, 4)
        for i in range(2):
            want = patches[i][:, keep[i]]
            torch.testing.assert_close(moved[i][:, new[i]], torch.flip(want, dims=(3,)) if flip else want)
    # other offsets round half up to whole patches (SMI's jitter_and_flip_index): 5 px -> 1, 2 px -> 1, 1 px -> 0
    assert moved_patches(keep, 5, 2, False, 8, 4)[0, 0] == 9 and moved_patches(keep, 1, -3, False, 8, 4)[0, 0] == 7


def test_smi_sparse_inversion_feeds_fewer_tokens(vit, one_thread):
    synth = SMI.from_budget("smoke", n_images=4, batch_size=4)  # 8 iterations, pruning at 2, 4, 6
    seen: list[int] = []
    hook = vit.blocks[0].attn.softmax.register_forward_hook(lambda m, a, o: seen.append(o.shape[-1]))
    try:
        out = synth.make_batch(vit, 0, batch_generator(0, 0), batch_size=4, image_shape=(3, 32, 32))
    finally:
        hook.remove()
    # tokens (CLS + patches) of the 8 iterations, then the final dense selection pass
    assert seen == [65, 65, 45, 45, 31, 31, 22, 22, 65]  # int(64 * .7) = 44, int(44 * .7) = 30, 21
    images, keep, labels = out["images"], out["keep"], out["labels"]
    k = int(65 * 0.7 ** 3)  # the official count: (patches + CLS) x prod(1 - r)
    assert keep.shape == (4, k) and keep.dtype == torch.int64 and labels.tolist() == sorted(labels.tolist())
    kept = nonzero_patches(images, 4)
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, keep, True))  # dropped patches are zero
    assert torch.equal(KeptPatches(vit)(images), vit(images, keep=keep))  # calib-sparse's forward


def test_clip_keeps_vit_pixels_in_the_valid_range(vit, one_thread):
    """A large lr pushes pixels far out; the clamp after every step keeps each channel in its range."""
    synth = SYNTHESIZERS["psaq-vit"].from_budget("smoke", n_images=2, batch_size=2, iters=3, lr=5.0)
    out = synth.make_batch(vit, 0, batch_generator(0, 0), batch_size=2, image_shape=(3, 32, 32))
    pre = model_info(vit).preprocess
    lo = (-torch.tensor(pre.mean) / torch.tensor(pre.std)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(pre.mean)) / torch.tensor(pre.std)).view(1, 3, 1, 1)
    x = out["images"]
    assert (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all()
    assert ((x - lo).abs() < 1e-6).any() or ((x - hi).abs() < 1e-6).any()  # the clamp was active


def test_smi_dense_and_config_errors(vit, resnet20, one_thread):
    out = SMI.from_budget("smoke", n_images=2, batch_size=2, iters=3, prune_its="").make_batch(
        vit, 0, batch_generator(0, 0), batch_size=2, image_shape=(3, 32, 32))
    assert out["keep"].shape == (2, 64) and nonzero_patches(out["images"], 4).all()
    for bad in ({"prune_its": "50,51"}, {"prune_ratio": "0.3,0.3"}, {"prune_ratio": "1.0"},
                {"final_select": "best"}):
        with pytest.raises(BadValueError):
            SMI.from_budget("smoke", **bad)
    with pytest.raises(BadValueError, match="zsq.models.vit"):
        synthesize(resnet20, "psaq-vit", budget="smoke", progress=False)


def test_psaq_v2_student_makes_hard_samples(vit, one_thread):
    """V2 builds its own W4A8 student and its KL term changes the pixels; the FP model is untouched."""
    from zsq.synth.vit import PSAQViTV2

    before = {k: v.clone() for k, v in vit.state_dict().items()}
    outs = {}
    for adv in (0.0, 1.0):
        synth = PSAQViTV2.from_budget("smoke", n_images=2, batch_size=2, rounds=1, adv_weight=adv)
        losses: list[float] = []
        outs[adv] = synth.make_batch(vit, 0, batch_generator(0, 0), batch_size=2, image_shape=(3, 32, 32),
                                     step=lambda it, total, loss: losses.append(loss))
        assert "labels" not in outs[adv] and len(losses) == 3  # no category guidance by default
    assert not torch.equal(outs[0.0]["images"], outs[1.0]["images"])
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())


# ----------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", METHODS)
def test_recipe_smoke_end_to_end(recipe, smoke_qmodel):
    """The shared smoke run (W4A4 on the trained ``cifar10_vit_tiny``; tests/test_contract.py checks its levels
    and its round trip): parts, the quantized matmuls, its synthetic set, and the quantized model close to the
    FP one on that set and accurate on real images."""
    from conftest import CIFAR_TEST, smoke_fp_model, smoke_synth_overrides

    assert len(METHODS) >= 4 and recipe in SYNTHESIZERS
    q, fp = smoke_qmodel(recipe), smoke_fp_model(recipe)
    res = record_of(q).result
    assert res["protocol"] == "vit-ptq" and res["recipe"]["synth"] == recipe
    assert res["recipe"]["quant"] == ("calib-sparse" if recipe == "smi" else "calib")
    assert sum(isinstance(m, QuantMatMul) for m in q.modules()) == 12
    data = SyntheticSet.load(res["synthetic"]["dir"])
    assert data.n_images == smoke_synth_overrides(recipe)["n_images"]
    x = data.images
    assert torch.isfinite(x).all() and x.abs().amax() > 0
    with torch.no_grad():
        if recipe == "smi":  # calibrated on the kept patches: compare on them
            err = _rel_err(KeptPatches(q)(x), KeptPatches(fp)(x))
        else:
            err = _rel_err(q(x), fp(x))
    assert err < 0.6, err  # W4A4 on 8 images: 0.28-0.43 measured
    top1 = zsq.evaluate(q, str(CIFAR_TEST), limit=300, progress=False)["top1"]
    assert top1 > 50.0, top1  # W4A4: 68-71 measured (seed 0)


def test_recipes_activation_observer_per_budget():
    """``default`` / ``smoke`` search activation ranges by MSE (chosen on the validation split), ``paper`` keeps
    the official min-max; ``--set a_observer=...`` still overrides."""
    from zsq.api import resolve

    for name in METHODS:
        assert resolve(name, budget="default").hparams["a_observer"] == "mse"
        assert resolve(name, budget="smoke").hparams["a_observer"] == "mse"
        assert resolve(name, budget="paper").hparams["a_observer"] == "minmax"
        assert resolve(name, budget="default", hparams={"a_observer": "minmax"}).hparams["a_observer"] == "minmax"
        assert resolve(name).hparams["w_observer"] == "minmax"
