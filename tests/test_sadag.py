"""The SADAG synthesizer (Genie-D + gradient matching): vectorised per-sample gradients against a loop,
the second-order path, the loss going down, the BN requirement and the recipe end to end.

Small on purpose (2 shared cores): batches of a few images, a few iterations.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from zsq.errors import BadValueError, ZsqError
from zsq.record import record_of
from zsq.synth import get_synthesizer, prepared, synthesize
from zsq.synth.base import batch_generator
from zsq.synth.sadag import GradientMatching, SadagConfig, quantizers_off

CIFAR_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "cifar10-jpeg" / "test.tar"


pytestmark = pytest.mark.usefixtures("one_thread")


def _frozen(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def test_config_presets_and_validation():
    smoke, default, paper = (SadagConfig.for_budget(b) for b in ("smoke", "default", "paper"))
    assert (smoke.iters, smoke.n_images, smoke.gm_every) == (20, 32, 2)  # Genie-D's smoke + the term's
    assert (default.iters, default.gm_every, default.n_neighbours, default.lambda_gm) == (300, 8, 1, 0.03)
    assert (paper.iters, paper.precision, paper.gm_every, paper.n_neighbours) == (4000, "fp32", 1, 2)
    for bad in ({"rho": 0}, {"gm_every": 0}, {"gm_start": 1.0}, {"q_protocol": "nope"}, {"q_a_observer": "x"}):
        with pytest.raises(ZsqError):  # BadValueError / UnknownNameError, one line
            SadagConfig.for_budget("smoke", **bad)


def test_per_sample_grads_match_loop_reference(resnet20):
    """vmap(grad) == one autograd.grad per image, values and the second-order path into x (float64:
    in fp32 the batched and single-image forwards differ by ~1e-7, enough to flip a rounding)."""
    m = _frozen(resnet20).double()
    cfg = SadagConfig.for_budget("smoke")
    gm = GradientMatching(m, cfg, (3, 32, 32), torch.Generator().manual_seed(0))
    assert gm.theta_names == ["layer3.2.conv1.weight", "layer3.2.conv2.weight", "linear.weight"]
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    gm.calibrate(x)
    g = gm.per_sample_grads(x)
    params = [gm.q.get_parameter(n) for n in gm.theta_names]
    assert g.shape == (3, sum(p.numel() for p in params))
    ref = []
    for i in range(3):
        xi = x[i:i + 1]
        with quantizers_off(gm.q):
            feat_fp, out_fp = gm.taps(xi)  # FP targets: no gradient to theta
        for p in params:
            p.requires_grad_(True)
        feat, out = gm.taps(xi)
        loss = (feat - feat_fp).pow(2).sum() + (out - out_fp).pow(2).sum()
        ref.append(torch.cat([t.flatten() for t in torch.autograd.grad(loss, params, create_graph=True)]))
        for p in params:
            p.requires_grad_(False)
    ref = torch.stack(ref)
    assert ref.abs().max() > 1e-3  # the quantization error gives non-trivial gradients
    torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-9)
    v = torch.randn_like(g)
    (dx,) = torch.autograd.grad((g * v).sum(), x, retain_graph=True)
    (dx_ref,) = torch.autograd.grad((ref * v).sum(), x)
    assert dx.abs().max() > 0
    torch.testing.assert_close(dx, dx_ref, rtol=1e-8, atol=1e-10)


def test_gradient_matching_term_descends(resnet20):
    """Descending the term alone (fixed neighbours) lowers it: the second-order gradient has the right sign."""
    m = _frozen(resnet20)
    cfg = SadagConfig.for_budget("smoke", rho=0.05)
    gm = GradientMatching(m, cfg, (3, 32, 32), torch.Generator())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.01)
    values = []
    for _ in range(4):
        gm.generator.manual_seed(3)  # same neighbours every step
        loss = gm(x)
        values.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert 0 < values[-1] < values[0], values


def test_chunked_term_equals_the_whole_batch(resnet20, monkeypatch):
    """The term builds its per-sample gradients ``chunk`` samples (with their neighbours) at a time, so its
    second-order graph is a chunk's, not the batch's (peak memory); its value and its gradient into what
    made the images are those of the whole batch at once, bit for bit (the unchunked formula, inline)."""
    import torch.nn.functional as F

    m = _frozen(resnet20)
    b, k = 8, 2
    cfg = SadagConfig.for_budget("default", n_neighbours=k)
    gm = GradientMatching(m, cfg, (3, 32, 32), torch.Generator())
    z = torch.randn(b, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(8, 3 * 32 * 32, generator=torch.Generator().manual_seed(2))

    def images():  # a non-leaf, like the generator's output
        return (z @ w).view(b, 3, 32, 32)

    gm.calibrate(images().detach())
    gm.evaluations = 1  # ranges fixed: both evaluations below use the same quantized model
    gm.generator.manual_seed(5)
    x = images()
    xs = torch.cat([x.unsqueeze(0), gm.neighbours(x)]).flatten(0, 1)
    g = gm.per_sample_grads(xs)
    ref = 0.03 * (1.0 - F.cosine_similarity(g[:b].unsqueeze(0), g[b:].view(k, b, -1), dim=-1)).mean()
    (ref_grad,) = torch.autograd.grad(ref + images().pow(2).sum(), z)

    sizes = []
    whole = GradientMatching.per_sample_grads
    monkeypatch.setattr(GradientMatching, "per_sample_grads", lambda self, x: sizes.append(len(x)) or whole(self, x))
    gm.chunk = 4
    gm.generator.manual_seed(5)
    term = gm(images(), 0.03)
    (grad,) = torch.autograd.grad(term + images().pow(2).sum(), z)
    assert sizes == [4 * (k + 1)] * 2  # two chunks of 4 samples and their neighbours, never the batch at once
    assert torch.equal(term, ref) and gm.last_value == pytest.approx(float(ref.detach()) / 0.03)
    assert torch.equal(grad, ref_grad) and grad.abs().max() > 0


def test_sadag_total_loss_decreases_and_model_untouched(resnet20):
    s = get_synthesizer("sadag", "smoke", {"iters": 6, "batch_size": 8, "gm_every": 1, "gm_start": 0.0})
    bns: list[float] = []
    with prepared(resnet20, s.config.channels_last):
        x = s.make_batch(resnet20, 0, batch_generator(0, 0), batch_size=8, image_shape=(3, 32, 32),
                         step=lambda it, n, loss: bns.append(loss))
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()
    assert [it for it, _ in s.gm_trace] == list(range(6))
    total = [b + s.config.lambda_gm * g for b, (_, g) in zip(bns, s.gm_trace)]
    assert total[-1] < 0.5 * total[0], total
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in resnet20.modules())
    # same batch again: reproducible (neighbour noise comes from the batch's stream)
    with prepared(resnet20, s.config.channels_last):
        y = s.make_batch(resnet20, 0, batch_generator(0, 0), batch_size=8, image_shape=(3, 32, 32))
    assert torch.equal(x, y)


def test_sadag_needs_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))
    with pytest.raises(BadValueError) as e:
        synthesize(net, "sadag", budget="smoke", image_size=32, progress=False)
    assert "BatchNorm" in str(e.value) and "\n" not in str(e.value)


def test_sadag_recipe_smoke_end_to_end(smoke_qmodel):
    """The shared smoke run (tests/test_contract.py checks its levels and round trip): parts and accuracy."""
    import zsq

    assert "sadag" in zsq.recipes.RECIPES.names()
    q = smoke_qmodel("sadag")
    res = record_of(q).result
    assert res["recipe"]["synth"] == "sadag" and res["recipe"]["quant"] == "genie-m"
    assert res["protocol"] == "genie-native"
    top1 = zsq.evaluate(q, str(CIFAR_TEST), limit=500, progress=False)["top1"]
    assert top1 > 50.0, top1
