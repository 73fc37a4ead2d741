"""Noise-optimisation synthesizers on the shared pixel loop: deepinversion, mixmix, kw, gznq, dsg,
intraq, hast, texq (smoke runs on the real ResNet-20, the loss terms against hand computations)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zsq.data.shards import sidecar_path
from zsq.errors import BadValueError, UnknownNameError
from zsq.record import model_info
from zsq.synth import SYNTHESIZERS, BNStatsLoss, PixelSynthesizer, get_synthesizer, synthesize, tv_loss
from zsq.synth.base import prepared
from zsq.synth.deepinversion import DEEPINVERSION_CIFAR10, DeepInversion, cutmix
from zsq.synth.dsg import DSG, lse_weights
from zsq.synth.intraq import focal_ce, laws_energy, laws_masks, leave_one_out_centres, margin_loss, soft_target_loss
from zsq.synth.pixel import cosine_lr, random_resized_crop_flip

NAMES = ["deepinversion", "mixmix", "kw", "gznq", "dsg", "intraq", "hast", "texq"]
LABELLED = [n for n in NAMES if n != "dsg"]
# a few iterations on 4 images (texq: its calibration stage shrunk too)
TINY = {"n_images": 4, "batch_size": 4, "iters": 3}
TINY_EXTRA = {"texq": {"calib_per_class": 1, "calib_iters": 2}}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread; ZSQ_HOME = the assets


@pytest.fixture
def model(resnet20):
    return resnet20


def _batch(synth, model, seed=0, n=4):
    with prepared(model, synth.config.channels_last):
        return synth.make_batch(model, 0, torch.Generator().manual_seed(seed), batch_size=n, image_shape=(3, 32, 32))


# -------------------------------------------------------------------------------------------------
# every synthesizer: smoke run, labels, the shared loop, determinism
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_smoke_preset_reduces_loss(model, name):
    s = synthesize(model, name, budget="smoke", progress=False)
    assert s.complete and s.images.shape == (32, 3, 32, 32) and torch.isfinite(s.images).all()
    # the per-iteration augmentation makes single values noisy: the last four against the first
    trace = [v for _, v in json.loads(sidecar_path(s.dir / "shard_00000.pt").read_text())["loss_trace"]]
    assert len(trace) == s.meta["config"]["iters"]
    assert sum(trace[-4:]) / 4 < 0.8 * trace[0], trace
    tensors = s.shard(0)
    if name in LABELLED:
        labels = tensors["labels"]
        assert labels.shape == (32,) and labels.dtype == torch.int64
        assert 0 <= int(labels.min()) and int(labels.max()) < 10
    else:
        assert set(tensors) == {"images"}


@pytest.mark.parametrize("name", NAMES)
def test_shared_loop_and_determinism(model, name, monkeypatch):
    cls = SYNTHESIZERS[name]
    assert issubclass(cls, PixelSynthesizer) and cls.optimize is PixelSynthesizer.optimize
    assert cls.augment is PixelSynthesizer.augment
    calls = []
    loop = PixelSynthesizer.optimize

    def counted(self, *a, **k):
        calls.append(type(self).__name__)
        return loop(self, *a, **k)

    monkeypatch.setattr(PixelSynthesizer, "optimize", counted)
    ov = {**TINY, **TINY_EXTRA.get(name, {})}
    a = _batch(get_synthesizer(name, "smoke", ov), model, seed=1)
    b = _batch(get_synthesizer(name, "smoke", ov), model, seed=1)
    c = _batch(get_synthesizer(name, "smoke", ov), model, seed=2)
    assert calls and set(calls) == {cls.__name__}
    images = (lambda o: o["images"] if isinstance(o, dict) else o)
    assert torch.equal(images(a), images(b))
    assert not torch.equal(images(a), images(c))
    if isinstance(a, dict):
        assert torch.equal(a["labels"], b["labels"]) and a["labels"].dtype == torch.int64


def test_dsg_without_slack_and_lse_is_zeroq(model):
    """The shared loop with ZeroQ's settings reproduces zsq's ZeroQ synthesizer bit for bit."""
    ov = {"iters": 4, "batch_size": 4, "n_images": 4}
    dsg = _batch(get_synthesizer("dsg", "smoke", {**ov, "slack": 0.0, "lse_weight": 1.0}), model)
    zq = _batch(get_synthesizer("zeroq", "smoke", ov), model)
    assert torch.equal(dsg, zq)


# -------------------------------------------------------------------------------------------------
# DSG: slack margins and layerwise sample enhancement
# -------------------------------------------------------------------------------------------------
def _bn_net(mu, var):
    bn = nn.BatchNorm2d(len(mu))
    bn.running_mean.copy_(torch.tensor(mu))
    bn.running_var.copy_(torch.tensor(var))
    return nn.Sequential(bn).eval()


def _images_with_stats(mu, sigma, d_mean, d_std, b=3, hw=8):
    """Images whose per-image channel mean is mu + d_mean * sigma and unbiased std sigma * (1 + d_std)."""
    z = torch.randn(b, len(mu), hw, hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean((2, 3), keepdim=True)) / z.std((2, 3), keepdim=True)
    mu, sigma = torch.tensor(mu).view(1, -1, 1, 1), torch.tensor(sigma).view(1, -1, 1, 1)
    return (mu + d_mean * sigma + z * sigma * (1 + d_std)).float()


def test_dsg_margin_is_zero_inside_the_slack():
    mu, var = [0.5, -1.0], [4.0, 0.25]
    sigma = [math.sqrt(v + 1e-6) for v in var]
    net = _bn_net(mu, var)
    synth = DSG.from_budget("smoke", slack=0.1, input_prior=False)
    opts = synth.bns_options(net)
    for inside in (0.05, -0.09):
        with torch.no_grad(), BNStatsLoss.preset("zeroq", net, **opts) as bns:
            net(_images_with_stats(mu, sigma, inside, inside))
            assert bns.loss().item() == pytest.approx(0.0, abs=1e-6)
    # outside: each difference counts by what exceeds 0.1 sigma: (0.3 - 0.1)^2 sigma^2 per image,
    # channel and statistic (mean and std), / B
    with torch.no_grad(), BNStatsLoss.preset("zeroq", net, **opts) as bns:
        net(_images_with_stats(mu, sigma, 0.3, 0.3, b=3))
        want = sum(2 * 3 * (0.2 * s) ** 2 for s in sigma) / 3
        torch.testing.assert_close(bns.loss(), torch.tensor(want), rtol=1e-3, atol=1e-5)
    # without slack the same images pay the whole difference
    with torch.no_grad(), BNStatsLoss.preset("zeroq", net, input_prior=False) as bns:
        net(_images_with_stats(mu, sigma, 0.05, 0.05))
        assert bns.loss().item() > 1e-4


def test_dsg_layerwise_sample_enhancement(model):
    w = lse_weights(3, 5, 2.0)
    assert w.tolist() == [[2, 1, 1, 2, 1], [1, 2, 1, 1, 2], [1, 1, 2, 1, 1]]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), BNStatsLoss.preset("zeroq", model) as bns:
        model(x)
        plain, per_image = bns.loss(), bns.image_layer_losses()
        n = len(bns.modules)
        torch.testing.assert_close(bns.loss(sample_weights=torch.ones(n, 4)), plain)
        torch.testing.assert_close(per_image.sum(1), bns.layer_losses())
        # image 1 gets twice its own term of layer 1
        lse = bns.loss(sample_weights=lse_weights(n, 4, 2.0))
        torch.testing.assert_close(lse - plain, per_image[[0, 1, 2, 3], [0, 1, 2, 3]].sum(), rtol=1e-5, atol=1e-5)


def test_gaussian_kl_reduction():
    mu, var = [0.5, -1.0], [4.0, 0.25]
    net = _bn_net(mu, var)
    x = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float() * 1.5 + 0.2
    with torch.no_grad(), BNStatsLoss(net, stats="batch", dispersion="var", unbiased=False, reduction="kl") as bns:
        net(x)
        got = bns.loss()
    m, v = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=False)
    s2 = torch.tensor(var, dtype=torch.float64) + 1e-6
    dm2 = (m - torch.tensor(mu, dtype=torch.float64)) ** 2
    want = (0.5 * (torch.log(s2 / (v + 1e-6)) + (v + 1e-6 + dm2) / s2 - 1)).sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(BadValueError):
        BNStatsLoss(net, dispersion="std", reduction="kl")


# -------------------------------------------------------------------------------------------------
# IntraQ / HAST / TexQ terms against hand computations
# -------------------------------------------------------------------------------------------------
def test_intraq_soft_target_hand_computation():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax: [0.25, 0.75], [0.5, 0.5]
    labels = torch.tensor([1, 0])
    got = soft_target_loss(logits, labels, torch.tensor([0.95, 1.0]))
    torch.testing.assert_close(got, torch.tensor(((0.75 - 0.95) ** 2 + (0.5 - 1.0) ** 2) / 2))


def test_intraq_targets_drawn_as_the_code_does(model):
    synth = get_synthesizer("intraq", "smoke")
    labels = torch.zeros(2000, dtype=torch.int64)
    (target_term, _) = synth.terms(model, labels, torch.Generator().manual_seed(0))
    # a logit vector that makes p_y = 1 exactly leaves (1 - t)^2: recover t per sample
    logits = torch.tensor([[100.0] + [0.0] * 9]).repeat(2000, 1)
    from zsq.synth.pixel import PixelState

    state = PixelState(0, None, None, [logits], labels, None, None, [])
    loss = target_term(state)
    # half the samples t ~ U(0.95, 1): E(1 - t)^2 = 0.05^2 / 3; the others t = 1
    assert loss.item() == pytest.approx(0.5 * 0.05 ** 2 / 3, rel=0.15)


def test_hast_focal_hand_computation():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    labels = torch.tensor([1, 0])  # p_y = 0.75 (CE -ln 0.75), 0.25 (CE ln 4)
    want = 10 * ((0.25 ** 2) * -math.log(0.75) + (0.75 ** 2) * math.log(4.0)) / 2
    torch.testing.assert_close(focal_ce(logits, labels, beta=10.0, gamma=2.0), torch.tensor(want, dtype=torch.float32))
    # gamma 0, beta 1 is plain CE
    torch.testing.assert_close(focal_ce(logits, labels, 1.0, 0.0), F.cross_entropy(logits, labels))
    # gamma < 1 (SynQ's 0.5) on a sample so confident that p_y == 1.0 in float32: finite value and gradient
    # ((1 - p)^0.5 has an infinite derivative at p = 1; the old code turned the whole batch NaN)
    x = torch.tensor([[60.0, 0.0], [0.0, math.log(3.0)]], requires_grad=True)
    assert F.softmax(x, 1)[0, 0].item() == 1.0
    loss = focal_ce(x, torch.tensor([0, 1]), 1.0, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, torch.tensor(0.5 * 0.25 ** 0.5 * -math.log(0.75)), rtol=1e-5, atol=1e-6)


def test_intraq_margin_and_leave_one_out_centres():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 4.0]])
    labels = torch.tensor([0, 0, 0, 1])
    centres, mask = leave_one_out_centres(feats, labels, 2)
    torch.testing.assert_close(centres[0], torch.tensor([0.5, 1.0]))  # mean of images 1 and 2
    torch.testing.assert_close(centres[2], torch.tensor([0.5, 0.5]))
    assert mask.tolist() == [1.0, 1.0, 1.0, 0.0]  # image 3 is alone in class 1
    # d = 1 - cos: identical -> 0 (below m_low 0.05: pays 0.05); orthogonal -> 1 (above m_up 0.8: pays 0.2)
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    c = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    got = margin_loss(h, c, torch.ones(3), 0.05, 0.8)
    d2 = 1 - 1 / math.sqrt(2)  # inside [0.05, 0.8]: free
    assert 0.05 < d2 < 0.8
    torch.testing.assert_close(got, torch.tensor((0.05 + 0.2) / (3 + 1e-6)))


def test_intraq_running_centres_are_ordered_state(model):
    synth = get_synthesizer("intraq", "smoke", {**TINY, "centres": "running"})
    assert synth.shardable is False and get_synthesizer("intraq", "smoke").shardable is True
    g = torch.Generator().manual_seed(0)
    with prepared(model, True):
        with pytest.raises(BadValueError, match="in order"):
            synth.make_batch(model, 1, g, batch_size=4, image_shape=(3, 32, 32))
        out = synth.make_batch(model, 0, g, batch_size=4, image_shape=(3, 32, 32))
        assert synth._counts.sum().item() == 4
        torch.testing.assert_close(synth._counts, torch.bincount(out["labels"], minlength=10).float())
        synth.make_batch(model, 1, g, batch_size=4, image_shape=(3, 32, 32))
        assert synth._counts.sum().item() == 8


def test_texq_laws_texture_energy():
    m = laws_masks()
    assert m.shape == (9, 5, 5)
    torch.testing.assert_close(m.sum((1, 2)), torch.zeros(9))  # no L5L5: every mask is zero-mean
    torch.testing.assert_close(m, m.transpose(1, 2))  # symmetric pairs averaged: rotation invariant
    flat = torch.full((2, 3, 12, 12), 0.7)
    torch.testing.assert_close(laws_energy(flat), torch.zeros(2, 27), atol=1e-4, rtol=0)  # fp32 conv sums: ~2e-5 by kernel
    stripes = torch.zeros(1, 3, 12, 12)
    stripes[..., ::2] = 1.0
    e = laws_energy(stripes)
    assert e.shape == (1, 27) and e.max() > 1.0


# -------------------------------------------------------------------------------------------------
# DeepInversion / MixMix pieces
# -------------------------------------------------------------------------------------------------
def test_tv_priors_match_deepinversion_formula():
    x = torch.tensor([[[[0.0, 1.0], [3.0, 7.0]]]])
    # right diffs: -1, -4; down: -3, -6; diag (1,0)-(0,1): 3-1=2; diag (0,0)-(1,1): -7
    torch.testing.assert_close(tv_loss(x, "l2"), torch.tensor(math.sqrt(17) + math.sqrt(45) + 2 + 7))
    torch.testing.assert_close(tv_loss(x, "l1"), torch.tensor(2.5 + 4.5 + 2 + 7))


def test_deepinversion_cosine_schedule_and_jitter():
    assert cosine_lr(0.2, 0, 2000, 100) == pytest.approx(0.002)
    assert cosine_lr(0.2, 99, 2000, 100) == pytest.approx(0.2)
    assert cosine_lr(0.2, 100, 2000, 100) == pytest.approx(0.2)
    assert cosine_lr(0.2, 1999, 2000, 100) < 1e-6
    di = DeepInversion()
    assert [di.default_jitter((3, s, s)) for s in (32, 224, 112)] == [2, 30, 15]


def test_deepinversion_adi_needs_a_student(model):
    with pytest.raises(BadValueError, match="student"):
        _batch(get_synthesizer("deepinversion", "smoke", {**TINY, "adi_scale": 0.2}), model)
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.linear.weight.mul_(0.5)
    cfg = DeepInversion.Config.for_budget("smoke", **TINY, adi_scale=0.2)
    synth = DeepInversion(cfg, student=student)
    assert synth.config.student.startswith("state_dict:")  # part of the cache key
    out = _batch(synth, model)
    assert torch.isfinite(out["images"]).all()
    assert all(p.requires_grad for p in student.parameters())  # frozen during the batch only
    assert not any(m._forward_hooks for m in student.modules())


def test_clip_keeps_pixels_in_the_valid_range(model):
    out = _batch(get_synthesizer("deepinversion", "smoke", {**TINY, "lr": 5.0}), model)
    pre = model_info(model).preprocess
    lo = (-torch.tensor(pre.mean) / torch.tensor(pre.std)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(pre.mean)) / torch.tensor(pre.std)).view(1, 3, 1, 1)
    assert (out["images"] >= lo - 1e-6).all() and (out["images"] <= hi + 1e-6).all()


def test_cutmix_soft_labels_match_the_pasted_area():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    mixed, soft = cutmix(x, labels, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    for i in range(4):
        own = (mixed[i, 0] == i).float().mean()  # each image's pixels carry its index
        torch.testing.assert_close(soft[i, i], own)


def test_random_resized_crop_identity_and_flip():
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = random_resized_crop_flip(x, 1.0, torch.Generator().manual_seed(1), ratio=(1.0, 1.0))
    for i in range(6):
        assert torch.allclose(y[i], x[i], atol=1e-5) or torch.allclose(y[i], x[i].flip(-1), atol=1e-5)
    z = random_resized_crop_flip(x, 0.5, torch.Generator().manual_seed(1))
    assert z.shape == x.shape and not torch.allclose(z, x)


def test_mixmix_loads_the_extra_models_offline(model):
    synth = get_synthesizer("mixmix", "smoke")
    extra = synth.extra_models(model)
    assert [model_info(m).id for m in extra] == ["cifar10_resnet32"]  # ResNet-20 itself is not doubled
    with pytest.raises(UnknownNameError):
        get_synthesizer("mixmix", "smoke", {"models": "cifar10_resnet21"}).extra_models(model)


@pytest.mark.parametrize("field,value", [
    ("schedule", "step"), ("init", "uniform2"), ("crop_prob", 1.5), ("lr", 0.0), ("iters", 0), ("jitter", -2),
    ("beta1", 1.0), ("label_mode", "sorted"),
])
def test_bad_loop_values(field, value):
    with pytest.raises(BadValueError):
        get_synthesizer("hast", "smoke", {field: value})


@pytest.mark.parametrize("name,field,value", [
    ("intraq", "centres", "global"), ("intraq", "target_pro", 1.5), ("mixmix", "mix_prob", -0.1),
    ("mixmix", "models", " , "), ("dsg", "slack", -1.0), ("texq", "calib_per_class", 0), ("hast", "gamma", -1.0),
    ("deepinversion", "adi_temperature", 0.0), ("kw", "ce_weight", -1.0),
])
def test_bad_method_values(name, field, value):
    with pytest.raises(BadValueError):
        get_synthesizer(name, "smoke", {field: value})


def test_presets():
    for name in NAMES:
        cls = SYNTHESIZERS[name].Config
        smoke, default = cls.for_budget("smoke"), cls.for_budget("default")
        assert smoke.n_images <= 32 and smoke.iters <= 30
        assert default.n_images == 5120 and default.batch_size == 256 and default.iters <= 120
    paper = {n: SYNTHESIZERS[n].Config.for_budget("paper") for n in NAMES}
    assert (paper["intraq"].iters, paper["intraq"].lr, paper["intraq"].patience, paper["intraq"].n_images) == \
        (1000, 0.5, 50, 5120)
    assert (paper["intraq"].target_pro, paper["intraq"].margin_low, paper["intraq"].margin_up) == (0.95, 0.05, 0.8)
    assert (paper["hast"].beta, paper["hast"].gamma, paper["hast"].crop_prob) == (10.0, 2.0, 0.0)
    di = paper["deepinversion"]
    assert (di.iters, di.lr, di.beta1, di.beta2, di.warmup, di.bns_weight, di.first_bn_multiplier, di.tv_l2, di.l2) \
        == (2000, 0.2, 0.5, 0.9, 100, 0.05, 10.0, 1e-4, 1e-5)
    cifar = DeepInversion.Config.for_budget("paper", **DEEPINVERSION_CIFAR10)  # the CIFAR-10 script's setting
    assert (cifar.lr, cifar.bns_weight, cifar.schedule, cifar.clip) == (0.05, 10.0, "constant", False)
