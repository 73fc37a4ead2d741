"""Synthesizer interface, the shared BN-statistics loss, shards/caching/resume, gaussian and zeroq."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from zsq.errors import BadValueError, DataError, OutputExistsError
from zsq.synth import (
    BNS_VARIANTS, SYNTHESIZERS, BNStatsLoss, SyntheticSet, ZeroQ, ZeroQConfig, batch_seed, image_prior_loss,
    synthesize,
)

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"

# BNS values are reduced in fp32 and compared with a float64 loop-over-images reference
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def model():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZSQ_HOME", str(ASSETS))
        from zsq.models.zoo import load_model

        return load_model("cifar10_resnet20")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSQ_HOME", str(ASSETS))
    monkeypatch.setenv("ZSQ_CACHE", str(tmp_path / "cache"))


# small zeroq settings that still run the real algorithm (default bf16 + channels_last path):
# batches of 4 images, 3 iterations
TINY = {"batch_size": 4, "iters": 3}


# -------------------------------------------------------------------------------------------------
# BN-statistics loss against a naive reference
# -------------------------------------------------------------------------------------------------
def _bn_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    acts, hs = [], []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            hs.append(m.register_forward_hook(lambda mod, inp, out: acts.append(inp[0])))
    model(x)
    for h in hs:
        h.remove()
    return acts


def _naive_stats(a: torch.Tensor, per_image: bool, unbiased: bool):
    """Mean / variance by explicit sums, one image at a time when per_image (float64)."""
    a = a.double()
    if per_image:
        means, vars_ = [], []
        for i in range(a.shape[0]):  # the loop the real implementation avoids
            f = a[i].reshape(a.shape[1], -1)
            n = f.shape[1]
            m = f.sum(1) / n
            means.append(m)
            vars_.append(((f - m[:, None]) ** 2).sum(1) / (n - 1 if unbiased else n))
        return torch.stack(means), torch.stack(vars_)
    f = a.transpose(0, 1).reshape(a.shape[1], -1)
    n = f.shape[1]
    m = f.sum(1) / n
    return m, ((f - m[:, None]) ** 2).sum(1) / (n - 1 if unbiased else n)


def _naive_loss(model, x, *, stats, dispersion, reduction, unbiased, eps=1e-6, data_eps=None, weights=None,
                margin=0.0, input_prior=False):
    data_eps = eps if data_eps is None else data_eps
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    acts = _bn_inputs(model, x)
    total = torch.zeros((), dtype=torch.float64)
    B = x.shape[0]
    for li, (bn, a) in enumerate(zip(bns, acts)):
        mean, var = _naive_stats(a, stats == "image", unbiased)
        mu, rv = bn.running_mean.double(), bn.running_var.double()
        if dispersion == "std":
            d_disp = (var + data_eps).sqrt() - (rv + eps).sqrt()
        else:
            d_disp = var - rv
        d_mean = mean - mu
        term = torch.zeros((), dtype=torch.float64)
        for d in (d_mean, d_disp):
            if margin:
                d = torch.clamp(d.abs() - margin, min=0)
            sq = (d ** 2).sum()
            C = d.shape[-1]
            term = term + {"mse": sq / d.numel(), "sql2_c": sq / C, "sql2_b": sq / B, "l2": sq.sqrt()}[reduction]
        total = total + (1.0 if weights is None else weights[li]) * term
    if reduction == "mse":
        total = total / len(bns)
    if input_prior:
        xm, xv = _naive_stats(x, True, unbiased)
        xs = (xv + data_eps).sqrt()
        total = total + ((xm ** 2).sum() + ((xs - 1) ** 2).sum()) / B
    return total


@pytest.mark.parametrize("stats", ["batch", "image"])
@pytest.mark.parametrize("dispersion", ["var", "std"])
@pytest.mark.parametrize("reduction", ["mse", "sql2_c", "sql2_b", "l2"])
def test_bns_matches_naive_reference(model, stats, dispersion, reduction):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    unbiased = stats == "image"
    with torch.no_grad(), BNStatsLoss(model, stats=stats, dispersion=dispersion, reduction=reduction,
                                      unbiased=unbiased) as bns:
        model(x)
        got = bns.loss()
    ref = _naive_loss(model, x, stats=stats, dispersion=dispersion, reduction=reduction, unbiased=unbiased)
    torch.testing.assert_close(got.double(), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("variant", sorted(BNS_VARIANTS))
def test_bns_named_variants_weights_margin_prior(model, variant):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 32, generator=g)
    v = dict(BNS_VARIANTS[variant])
    n_layers = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    w = [1.0 + 0.1 * i for i in range(n_layers)]
    first = v.pop("first_layer_weight", None)
    ref_w = list(w)
    if first:
        ref_w[0] *= first
    with torch.no_grad(), BNStatsLoss.preset(variant, model, layer_weights=w, margin=0.05) as bns:
        model(x)
        got, parts = bns.loss(parts=True)
    ref = _naive_loss(model, x, stats=v["stats"], dispersion=v["dispersion"], reduction=v["reduction"],
                      unbiased=v["unbiased"], eps=v.get("eps", 1e-6), data_eps=v.get("data_eps"), weights=ref_w,
                      margin=0.05, input_prior=v["input_prior"])
    torch.testing.assert_close(got.double(), ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(parts["bns"] + parts["prior"], got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("variant", ["zeroq", "genie"])
def test_bns_gradient_matches_reference_and_hooks_removed(model, variant, fused):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 32, 32, generator=g)
    x1 = x0.clone().requires_grad_(True)
    with BNStatsLoss.preset(variant, model, fused=fused) as bns:
        model(x1)
        bns.loss().backward()
    x2 = x0.double().clone().requires_grad_(True)
    m64 = copy.deepcopy(model).double()
    v = BNS_VARIANTS[variant]
    _naive_loss(m64, x2, stats=v["stats"], dispersion=v["dispersion"], reduction=v["reduction"], unbiased=True,
                data_eps=v["data_eps"], input_prior=True).backward()
    torch.testing.assert_close(x1.grad.double(), x2.grad, rtol=1e-3, atol=1e-6)
    assert all(not m._forward_hooks for m in model.modules())
    assert not model._forward_pre_hooks


def test_bns_bf16_autocast_close_to_fp32(model):
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = []
    for ctx in (torch.autocast("cpu", enabled=False), torch.autocast("cpu", dtype=torch.bfloat16)):
        with torch.no_grad(), BNStatsLoss.preset("genie", model) as bns, ctx:
            model(x)
            out.append(bns.loss())
    assert out[1].dtype == torch.float32
    torch.testing.assert_close(out[1], out[0], rtol=0.05, atol=0.0)  # bf16 has an 8-bit mantissa


def test_image_prior_is_zero_for_standardised_images():
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(5)).double()
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
    torch.testing.assert_close(image_prior_loss(x, True, 0.0), torch.zeros((), dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_bns_bad_options(model):
    with pytest.raises(BadValueError):
        BNStatsLoss(model, reduction="l1")
    with pytest.raises(BadValueError):
        BNStatsLoss(model, layer_weights=[1.0, 2.0])
    with pytest.raises(BadValueError):
        BNStatsLoss(nn.Sequential(nn.Conv2d(3, 3, 1)))


# -------------------------------------------------------------------------------------------------
# configs and the registry
# -------------------------------------------------------------------------------------------------
def test_registry_and_budget_presets():
    assert {"gaussian", "zeroq"} <= set(SYNTHESIZERS.names())
    paper, default, smoke = (ZeroQConfig.for_budget(b) for b in ("paper", "default", "smoke"))
    assert (paper.n_images, paper.batch_size, paper.iters, paper.lr, paper.patience, paper.min_lr) == \
        (32, 32, 500, 0.5, 100, 1e-4)
    assert default.n_images == 256 and smoke.iters <= 30
    assert ZeroQConfig.for_budget("smoke", iters="7", channels_last="false").iters == 7
    with pytest.raises(BadValueError, match="did you mean iters"):
        ZeroQConfig.for_budget("smoke", iter=3)
    with pytest.raises(BadValueError):
        ZeroQConfig.for_budget("smoke", precision="fp16")


def test_zeroq_official_initialisation():
    from zsq.synth.zeroq import initial_pixels

    x = initial_pixels((2, 3, 8, 8), torch.Generator().manual_seed(0))
    codes = x * 5418.75 + 127.5  # (randint(0, 255) - 127.5) / 5418.75 in the official data_utils.py
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.min() >= 0 and codes.max() <= 254 and x.abs().max() < 0.0236


def test_batch_seed_depends_on_seed_and_index_only():
    assert batch_seed(0, 1) == batch_seed(0, 1)
    assert len({batch_seed(s, k) for s in range(3) for k in range(3)}) == 9


# -------------------------------------------------------------------------------------------------
# synthesizers and the runner
# -------------------------------------------------------------------------------------------------
def test_gaussian(model, tmp_path):
    s = synthesize(model, "gaussian", progress=False)
    x = s.images
    assert x.shape == (256, 3, 32, 32) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert s.dir.parent == tmp_path / "cache" / "synthetic"
    again = synthesize(model, "gaussian", progress=False, seed=0, out_dir=tmp_path / "o")
    assert torch.equal(again.images, x) and again.sha256 == s.sha256  # byte-identical shards
    assert not torch.equal(synthesize(model, "gaussian", progress=False, seed=1).images, x)


def test_zeroq_smoke_reduces_loss_and_restores_model(model):
    model.train()
    model.conv1.weight.requires_grad_(True)
    try:
        s = synthesize(model, "zeroq", budget="smoke", progress=False)
        assert model.training and model.layer1[0].bn1.training
        assert all(p.requires_grad for p in model.parameters())
        assert model.conv1.weight.is_contiguous()
    finally:
        model.eval()
    assert s.images.shape == (32, 3, 32, 32) and torch.isfinite(s.images).all()
    (shard,) = s.meta["shards"]
    assert shard["loss_last"] < 0.5 * shard["loss_first"], shard
    # the recorded loss agrees with the loss of the saved images (one more Adam step taken since)
    with torch.no_grad(), BNStatsLoss.preset("zeroq", model) as bns:
        model(s.images)
        assert bns.loss().item() < 0.5 * shard["loss_first"]


def test_batch_determinism_alone_vs_among_others(model, tmp_path):
    both = synthesize(model, "zeroq", budget="smoke", n_images=8, overrides=TINY, progress=False,
                      out_dir=tmp_path / "both")
    alone = synthesize(model, "zeroq", budget="smoke", n_images=8, overrides=TINY, progress=False,
                       out_dir=tmp_path / "alone", batches=[1])
    assert both.complete and not alone.complete and alone.sha256 is None
    assert [s["index"] for s in alone.shards] == [1]
    assert torch.equal(alone.shard(1)["images"], both.shard(1)["images"])
    assert not torch.equal(both.shard(0)["images"], both.shard(1)["images"])
    assert not (tmp_path / "alone" / "meta.json").exists()
    # the missing batch completes the set, identical to the one made in one go
    done = synthesize(model, "zeroq", budget="smoke", n_images=8, overrides=TINY, progress=False,
                      out_dir=tmp_path / "alone", batches=[0])
    assert done.complete and done.sha256 == both.sha256
    assert torch.equal(done.images, both.images)


def test_resume_skips_finished_shards(model, tmp_path):
    kw = dict(budget="smoke", n_images=12, overrides=TINY, progress=False)
    full = synthesize(model, "zeroq", out_dir=tmp_path / "full", **kw)

    class Stop(Exception):
        pass

    def interrupt(k, path):
        raise Stop

    with pytest.raises(Stop):
        synthesize(model, "zeroq", out_dir=tmp_path / "run", on_shard=interrupt, **kw)
    d = tmp_path / "run"
    assert (d / "shard_00000.pt").is_file() and not (d / "shard_00001.pt").exists()
    assert not (d / "meta.json").exists()
    with pytest.raises(DataError):
        SyntheticSet.load(d)
    mtime = (d / "shard_00000.pt").stat().st_mtime_ns
    made = []
    s = synthesize(model, "zeroq", out_dir=d, on_shard=lambda k, p: made.append(k), **kw)
    assert made == [1, 2]
    assert (d / "shard_00000.pt").stat().st_mtime_ns == mtime
    assert s.complete and s.n_images == 12 and s.sha256 == full.sha256
    assert torch.equal(s.images, full.images)

    # a deleted last shard is made again, the rest skipped
    (d / "meta.json").unlink()
    (d / "shard_00002.pt").unlink()
    made.clear()
    s2 = synthesize(model, "zeroq", out_dir=d, on_shard=lambda k, p: made.append(k), **kw)
    assert made == [2] and torch.equal(s2.images, full.images)


def test_load_verifies_checksums(model, tmp_path):
    s = synthesize(model, "zeroq", budget="smoke", n_images=8, overrides=TINY, progress=False)
    loaded = SyntheticSet.load(s.dir)
    assert loaded.sha256 == s.sha256 and loaded.n_images == 8
    assert torch.equal(loaded.images, s.images)
    meta = json.loads((s.dir / "meta.json").read_text())
    assert meta["n_images"] == 8 and len(meta["shards"]) == 2 and meta["config"]["iters"] == 3
    assert all(len(sh["sha256"]) == 64 and sh["wall_s"] >= 0 for sh in meta["shards"])
    # weights_only loading works
    obj = torch.load(s.dir / "shard_00000.pt", weights_only=True)
    assert set(obj) == {"images"}

    p = s.dir / "shard_00001.pt"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum") as e:
        SyntheticSet.load(s.dir)
    assert "\n" not in str(e.value)
    p.unlink()
    with pytest.raises(DataError, match="missing"):
        SyntheticSet.load(s.dir)
    with pytest.raises(DataError, match="does not exist"):
        SyntheticSet.load(s.dir / "nope")


def test_diverged_synthesis_writes_no_shard_and_nan_sets_are_refused(model, tmp_path, monkeypatch):
    """A batch of non-finite images stops the synthesis with a one-line error before its shard is
    written (the earlier shards stay for a resume); a set on disk holding NaN images (made before this
    check) is refused when its images are read, not handed to a quantizer."""
    from zsq.synth.zeroq import ZeroQ

    kw = dict(budget="smoke", n_images=12, overrides=TINY, progress=False)
    real = ZeroQ.make_batch

    def nan_second(self, model, index, *a, **k):
        out = real(self, model, index, *a, **k)
        return out * float("nan") if index == 1 else out

    monkeypatch.setattr(ZeroQ, "make_batch", nan_second)
    d = tmp_path / "run"
    with pytest.raises(BadValueError, match="non-finite images in batch 1") as e:
        synthesize(model, "zeroq", out_dir=d, **kw)
    assert "\n" not in str(e.value)
    assert (d / "shard_00000.pt").is_file() and not (d / "shard_00001.pt").exists()
    assert not (d / "meta.json").exists()
    monkeypatch.setattr(ZeroQ, "make_batch", real)
    s = synthesize(model, "zeroq", out_dir=d, **kw)  # resumes from shard 1
    assert s.complete and torch.isfinite(s.images).all()

    # a set whose shard holds NaN (consistent checksums: as an older zsq wrote it)
    bad = tmp_path / "bad"
    monkeypatch.setattr(ZeroQ, "make_batch", nan_second)
    monkeypatch.setattr(torch, "isfinite", lambda t: torch.ones_like(t, dtype=torch.bool))
    synthesize(model, "zeroq", out_dir=bad, **kw)
    monkeypatch.undo()
    loaded = SyntheticSet.load(bad)  # checksums fine
    with pytest.raises(DataError, match="non-finite images"):
        loaded.images


def test_cache_reuse_returns_immediately(model, monkeypatch):
    kw = dict(budget="smoke", n_images=8, overrides=TINY, progress=False)
    first = synthesize(model, "zeroq", **kw)

    def boom(*a, **k):
        raise AssertionError("make_batch called for a finished set")

    monkeypatch.setattr(ZeroQ, "make_batch", boom)
    again = synthesize(model, "zeroq", **kw)
    assert again.dir == first.dir and again.sha256 == first.sha256
    assert torch.equal(again.images, first.images)
    # another seed / setting is another key
    monkeypatch.undo()
    other = synthesize(model, "zeroq", seed=1, **kw)
    assert other.dir != first.dir


def test_out_dir_with_other_settings_is_refused(model, tmp_path):
    kw = dict(budget="smoke", n_images=4, overrides=TINY, progress=False, out_dir=tmp_path / "o")
    synthesize(model, "zeroq", **kw)
    with pytest.raises(OutputExistsError):
        synthesize(model, "zeroq", seed=5, **kw)


def test_runner_shows_progress_without_error(model, capsys):
    s = synthesize(model, "zeroq", budget="smoke", n_images=4, overrides={**TINY, "iters": 2}, progress=True)
    assert s.n_images == 4


@pytest.mark.parametrize("precision,channels_last", [("fp32", False), ("bf16", True)])
def test_precision_and_layout_paths(model, precision, channels_last):
    s = synthesize(model, "zeroq", budget="smoke", n_images=4, progress=False,
                   overrides={**TINY, "iters": 15, "precision": precision, "channels_last": channels_last})
    assert s.meta["config"]["precision"] == precision
    assert s.images.dtype == torch.float32 and s.images.is_contiguous()
    sh = s.meta["shards"][0]
    assert sh["loss_last"] < sh["loss_first"]
    assert model.conv1.weight.is_contiguous()  # layout restored


def test_unregistered_name(model):
    from zsq.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="zeroq"):
        synthesize(model, "zeroqq", progress=False)

