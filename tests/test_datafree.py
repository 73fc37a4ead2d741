"""Synthesis-free recipes (issue 7): DFQ's cross-layer equalization, high-bias absorption and bias
correction, SQuant's CASE rounding, UDFC's compensation, BN-statistics activation ranges, and the
dfq / squant / udfc recipes end to end on ResNet-20 under the `fixed` protocol."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import zsq
from zsq.errors import ZsqError
from zsq.ptq import bn_ranges, dfq, squant, udfc
from zsq.quant.modules import QuantConv2d
from zsq.recipes import PRE_STEPS, QUANTIZERS, RECIPES
from zsq.record import record_of

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
TEST_TAR = ASSETS / "cifar10-jpeg" / "test.tar"
TOL = dict(rtol=1e-4, atol=1e-4)  # CLE is exact up to float32 rounding


def _spread_bn(bn: nn.BatchNorm2d, g: torch.Generator, beta_shift: float = 0.0) -> None:
    """Random BN statistics with per-channel scales spread over two decades (unequal ranges)."""
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(10 ** (torch.rand(c, generator=g) * 2 - 1))
        bn.bias.copy_(torch.randn(c, generator=g) * 0.5 + beta_shift)
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_var.copy_(10 ** (torch.rand(c, generator=g) * 2 - 1))


class SepNet(nn.Module):
    """conv -> BN -> act -> 1x1 expand -> BN -> act -> depthwise 3x3 -> BN -> act -> 1x1 project -> BN."""

    def __init__(self, act=nn.ReLU, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem, self.bn_s, self.act_s = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act()
        self.expand, self.bn0, self.act0 = nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), act()
        self.dw, self.bn1, self.act1 = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24), act()
        self.project, self.bn2 = nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
            if isinstance(m, nn.BatchNorm2d):
                _spread_bn(m, g)
        self.eval()

    def forward(self, x):
        x = self.act_s(self.bn_s(self.stem(x)))
        x = self.act0(self.bn0(self.expand(x)))
        x = self.act1(self.bn1(self.dw(x)))
        return self.bn2(self.project(x))


# -- cross-layer equalization ------------------------------------------------------------------------

def test_cle_resnet20_keeps_function_and_equalizes_ranges(resnet20, real_batch):
    m = copy.deepcopy(resnet20)
    pairs = dfq.find_pairs(m)
    # the nine conv1 -> bn1 -> relu1 -> conv2 pairs; block outputs feed the residual path: no pair
    assert [(p.a, p.b) for p in pairs] == [(f"layer{i}.{j}.conv1", f"layer{i}.{j}.conv2")
                                           for i in (1, 2, 3) for j in range(3)]
    before = [dfq.pair_ranges(m, p) for p in pairs]
    assert max(float((r1 / r2).log().abs().max()) for r1, r2 in before) > 1.0  # really unequal before
    dfq.equalize(m, pairs)
    for p in pairs:
        r1, r2 = dfq.pair_ranges(m, p)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=1e-7)
    x, _ = real_batch
    with torch.inference_mode():
        torch.testing.assert_close(m(x), resnet20(x), **TOL)
    # BN kept (so synthesizers can still match its statistics) and its running statistics untouched
    for p in pairs:
        torch.testing.assert_close(m.get_submodule(p.bn).running_var, resnet20.get_submodule(p.bn).running_var)


def test_cle_depthwise_separable_pairs_converge():
    net = SepNet()
    ref = copy.deepcopy(net)
    pairs = dfq.find_pairs(net)
    assert [(p.a, p.b) for p in pairs] == [("stem", "expand"), ("expand", "dw"), ("dw", "project")]
    info = dfq.equalize(net, pairs)
    assert 1 < info["iterations"] < 100  # chained pairs need several sweeps
    for p in pairs:
        r1, r2 = dfq.pair_ranges(net, p)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=1e-7)
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), **TOL)


def test_relu6_is_replaced_or_stops_the_pair():
    assert dfq.find_pairs(SepNet(nn.ReLU6), relu6="skip") == []
    net = SepNet(nn.ReLU6)
    info = dfq.equalize(net, relu6="replace")
    assert info["replaced_relu6"] == ["act_s", "act0", "act1"]
    assert not any(isinstance(m, nn.ReLU6) for m in net.modules())


def test_high_bias_absorption_keeps_function_where_the_preactivation_is_positive():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 5, 1)).eval()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():  # BN statistics of this very batch: its output is N(beta, gamma^2)
        y = net[0](x)
        net[1].running_mean.copy_(y.mean((0, 2, 3)))
        net[1].running_var.copy_(y.var((0, 2, 3), unbiased=False))
        net[1].weight.copy_(torch.rand(6) + 0.5)
        net[1].bias.copy_(torch.tensor([8.0, 0.2, 9.0, -1.0, 10.0, 0.0]))
        ref = net(x)
    bias_before = net[3].bias.clone()
    pairs = dfq.find_pairs(net)
    assert [(p.a, p.b, p.pads) for p in pairs] == [("0", "3", False)]
    assert dfq.absorb_high_bias(net, pairs, n_sigma=6.0) == 1
    assert float(net[1].bias[0].detach()) < 8.0 and float(net[1].bias[1].detach()) == pytest.approx(0.2)
    assert not torch.equal(net[3].bias, bias_before)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, **TOL)


# -- BN statistics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mu,sigma,lo,hi", [(0.5, 1.0, 0.0, math.inf), (-1.0, 2.0, 0.0, math.inf),
                                            (1.0, 0.5, 0.0, 1.2), (0.0, 1.0, -0.5, 0.7)])
def test_clipped_normal_mean_matches_monte_carlo(mu, sigma, lo, hi):
    z = mu + sigma * torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mc = z.clamp(lo, hi).mean()
    got = bn_ranges.clipped_normal_mean(torch.tensor([mu], dtype=torch.float64),
                                        torch.tensor([sigma], dtype=torch.float64), lo, hi)
    torch.testing.assert_close(got[0], mc, rtol=0, atol=3e-3)


def test_bn_consistent_stats_match_bn_parameters(resnet20):
    st = bn_ranges.collect_stats(resnet20, n=8)
    bn = resnet20.layer2[1].bn1
    pre = st.modules["layer2.1.relu1"].pre
    torch.testing.assert_close(pre.mean, bn.bias.detach(), rtol=0, atol=1e-4)
    torch.testing.assert_close(pre.std, bn.weight.detach().abs(), rtol=1e-3, atol=1e-4)
    assert st.input_producer["layer2.1.conv2"] == "layer2.1.relu1"


def test_models_without_batchnorm_get_a_clear_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    for recipe in _synthesis_free_recipes():
        with pytest.raises(ZsqError, match="BatchNorm"):
            zsq.quantize(net, recipe, 4, 4, protocol="fixed", progress=False)
    with pytest.raises(ZsqError, match="BatchNorm"):
        PRE_STEPS["dfq"](copy.deepcopy(net), {})


# -- bias correction ----------------------------------------------------------------------------------

def test_bias_correction_removes_the_expected_shift_of_a_gaussian_fed_layer():
    """A 3-bit conv fed relu(z), z ~ N(mu_c, sigma_c^2): the mean output error (over many samples) is
    mostly E[eps W] E[x], which the analytic correction removes."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=0, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        conv.bias.zero_()
    q = QuantConv2d.from_float(copy.deepcopy(conv), 3)
    w_fp = conv.weight.detach().clone()
    mu, sigma = torch.randn(16, generator=g) + 0.5, torch.rand(16, generator=g) + 0.5
    x = (mu[None, :, None, None] + sigma[None, :, None, None] * torch.randn(512, 16, 6, 6, generator=g)).clamp_min(0)

    def shift():
        with torch.no_grad():
            return (q(x) - conv(x)).mean((0, 2, 3))

    before = shift()
    e = bn_ranges.clipped_normal_mean(mu, sigma)
    dfq.correct_layer_bias(q, w_fp, e, e)
    after = shift()
    assert float(before.abs().mean()) > 0.05
    assert float(after.abs().mean()) < 0.1 * float(before.abs().mean())


def test_bias_correction_reduces_mean_output_error_of_resnet20(resnet20, real_batch):
    """Network level, weights only (W3, activations FP): mean logit shift against the FP model."""
    from zsq.quant.protocol import apply_protocol, set_act_mode
    from zsq.spec import PROTOCOLS

    st = bn_ranges.collect_stats(resnet20)
    q = apply_protocol(resnet20, PROTOCOLS["fixed"], 3, 8)
    set_act_mode(q, "off")
    x, _ = real_batch
    with torch.inference_mode():
        fp = resnet20(x)
        before = (q(x) - fp).mean(0).abs().mean()
    dfq.bias_correct(q, st)
    with torch.inference_mode():
        after = (q(x) - fp).mean(0).abs().mean()
    assert after < 0.7 * before


# -- SQuant -------------------------------------------------------------------------------------------

def _reference_squant(v: torch.Tensor, qmin: int, qmax: int, kernel: bool, channel: bool) -> torch.Tensor:
    """Plain-Python loop over kernels and channels with the official code's semantics."""
    o, i, kk = v.shape
    vals = v.tolist()
    rn = [[[min(max(float(round(x)), qmin), qmax) for x in kern] for kern in ch] for ch in vals]
    err = [[[rn[a][b][c] - vals[a][b][c] for c in range(kk)] for b in range(i)] for a in range(o)]
    cand = {}  # (a, b, c) -> (direction, priority) offered to the channel level
    if kernel and kk > 1:
        for a in range(o):
            for b in range(i):
                e = sum(err[a][b])
                d = 1 if e < 0 else -1
                ok = [c for c in range(kk) if (d == 1 and err[a][b][c] < 0 and rn[a][b][c] + 1 <= qmax)
                      or (d == -1 and err[a][b][c] > 0 and rn[a][b][c] - 1 >= qmin)]
                ok.sort(key=lambda c: (-abs(err[a][b][c]), c))
                k = int(round(abs(e)))
                for c in ok[:k]:
                    rn[a][b][c] += d
                    err[a][b][c] += d
                if k >= abs(e) and k > 0 and ok[:k]:
                    c = ok[k - 1]
                    cand[(a, b, c)] = (-d, abs(err[a][b][c]))
                elif k < abs(e) and k < len(ok):
                    c = ok[k]
                    cand[(a, b, c)] = (d, abs(err[a][b][c]))
    else:
        for a in range(o):
            for b in range(i):
                for c in range(kk):
                    if err[a][b][c] < 0 and rn[a][b][c] + 1 <= qmax:
                        cand[(a, b, c)] = (1, abs(err[a][b][c]))
                    elif err[a][b][c] > 0 and rn[a][b][c] - 1 >= qmin:
                        cand[(a, b, c)] = (-1, abs(err[a][b][c]))
    if channel:
        for a in range(o):
            e = sum(sum(kern) for kern in err[a])
            d = 1 if e < 0 else -1
            ok = [(b, c) for b in range(i) for c in range(kk) if cand.get((a, b, c), (0, 0))[0] == d]
            ok.sort(key=lambda bc: (-cand[(a, *bc)][1], bc[0] * kk + bc[1]))
            for b, c in ok[:int(round(abs(e)))]:
                rn[a][b][c] += d
    return torch.tensor(rn)


@pytest.mark.parametrize("shape", [(5, 4, 9), (4, 1, 9), (6, 12, 1)], ids=["conv", "depthwise", "linear"])
@pytest.mark.parametrize("mode", ["squant", "squant-k", "squant-c"])
def test_squant_vectorised_equals_loop_reference(shape, mode):
    g = torch.Generator().manual_seed(sum(shape) * 10 + ["squant", "squant-k", "squant-c"].index(mode))
    v = torch.rand(shape, generator=g, dtype=torch.float64) * 15  # codes of a 4-bit grid [0, 15]
    kernel, channel = mode in ("squant", "squant-k"), mode in ("squant", "squant-c")
    got = squant.squant_round(v, 0, 15, kernel=kernel and shape[2] > 1, channel=channel)
    ref = _reference_squant(v, 0, 15, kernel and shape[2] > 1, channel)
    assert torch.equal(got.double(), ref.double())


def test_squant_flips_never_increase_its_objective():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(32, 16, 9, generator=g) * 7  # 3-bit grid [0, 7]
    rtn = torch.round(v)
    k_only = squant.squant_round(v, 0, 7, kernel=True, channel=False)
    full = squant.squant_round(v, 0, 7, kernel=True, channel=True)
    o_rtn, o_k, o_full = (squant.case_objective(c, v) for c in (rtn, k_only, full))
    # element level: every weight stays within one step of its value, on the grid
    for c, o in ((k_only, o_k), (full, o_full)):
        assert o["element_max"] <= 1.0 and torch.equal(c, c.round()) and c.min() >= 0 and c.max() <= 7
    # kernel level: every kernel's error sum within 0.5 after SQuant-K, and the total never larger
    assert float((k_only - v).sum(2).abs().max()) <= 0.5 + 1e-5
    assert o_k["kernel_abs_sum"] <= o_rtn["kernel_abs_sum"]
    # channel level: every channel's sum within 0.5, kernels within 1, totals never larger
    assert float((full - v).sum((1, 2)).abs().max()) <= 0.5 + 1e-5
    assert float((full - v).sum(2).abs().max()) <= 1.0 + 1e-5
    assert o_full["channel_abs_sum"] <= o_k["channel_abs_sum"] <= o_rtn["channel_abs_sum"]


def test_squant_on_a_resnet20_layer(resnet20):
    from zsq.quant.protocol import apply_protocol
    from zsq.spec import PROTOCOLS

    q = apply_protocol(resnet20, PROTOCOLS["fixed"], 4, 4)
    layer = q.layer2[1].conv1
    w0 = layer.weight.detach().clone()
    v, s, z = squant.codes_view(layer)
    rtn = squant.case_objective(torch.round(v).clamp(0, 15), v)
    obj = squant.squant_layer_(layer, "squant")
    w1 = layer.weight.detach()
    assert torch.equal(layer.qweight().detach(), w1)  # the weight lies on the quantizer's grid
    assert bool(((w1 - w0).abs() <= s * (1 + 1e-4)).all())  # within one step
    assert all(len(torch.unique(w1[c])) <= 16 for c in range(w1.shape[0]))
    assert obj["kernel_abs_sum"] < rtn["kernel_abs_sum"] and obj["channel_abs_sum"] < 0.25 * rtn["channel_abs_sum"]


# -- UDFC ---------------------------------------------------------------------------------------------

def test_udfc_closed_form_matches_least_squares_on_samples():
    """(s, t) from the quadrature equal the least-squares fit a ~ s a~ + t on bivariate samples."""
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.tensor([0.3, -0.2, 1.0]), torch.tensor([1.0, 0.5, 0.8])
    var_e, cov = torch.tensor([0.09, 0.04, 0.25]), torch.tensor([0.02, -0.005, 0.05])
    s, t, eat = udfc.compensation(mu, sigma, var_e, cov, "relu", 0.0, 1.5, 0.0)
    n = 400_000
    for c in range(3):
        u1, u2 = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
        sd_e = math.sqrt(float(var_e[c]))
        rho = float(cov[c]) / (float(sigma[c]) * sd_e)
        z = float(mu[c]) + float(sigma[c]) * u1
        e = sd_e * (rho * u1 + math.sqrt(1 - rho * rho) * u2)
        a, at = z.clamp_min(0), (z + e).clamp(0, 1.5)
        s_ls = float(((a - a.mean()) * (at - at.mean())).mean() / at.var(unbiased=False))
        assert float(s[c]) == pytest.approx(s_ls, abs=0.01)
        assert float(t[c]) == pytest.approx(float(a.mean() - s_ls * at.mean()), abs=0.01)
        assert float(eat[c]) == pytest.approx(float(at.mean()), abs=0.005)


# -- recipes end to end -------------------------------------------------------------------------------

def _synthesis_free_recipes() -> list[str]:
    """The registered recipes that synthesize nothing and train nothing (DFQ, SQuant, UDFC ...)."""
    from zsq.api import list_methods

    return [m["name"] for m in list_methods() if m["family"] == "synthesis-free"]


def test_recipes_are_registered():
    assert "dfq" in PRE_STEPS
    assert {"dfq", "squant", "udfc"} <= set(_synthesis_free_recipes())
    for name in _synthesis_free_recipes():
        r = RECIPES[name]
        assert (r.family, r.kind, r.synth, r.protocol, r.quant) == ("synthesis-free", "PTQ", None, "fixed", name)
        assert r.paper and name in QUANTIZERS
    assert RECIPES["dfq"].pre == "dfq"


@pytest.mark.parametrize("recipe", _synthesis_free_recipes())
def test_recipe_runs_on_resnet20_w4a4(recipe, smoke_qmodel):
    """The shared smoke run (the same as the default budget's: these recipes have no budget; its native
    protocol is `fixed`; tests/test_contract.py checks its levels) is accurate."""
    q = smoke_qmodel(recipe)
    res = record_of(q).result
    assert res["synthetic"]["n_images"] == 0 and res["protocol"] == "fixed"
    assert res["recipe"]["hparams"] == zsq.api.resolve(recipe, budget="default").hparams
    top1 = zsq.evaluate(q, TEST_TAR, limit=1000, progress=False)["top1"]
    assert top1 >= 70.0, top1  # FP 81.03 (full set); W4A4 of these recipes ~76-79 on the full set


def test_w8a8_is_near_fp_and_w2a2_far_below(resnet20):
    fp = zsq.evaluate(resnet20, TEST_TAR, limit=1000, progress=False)["top1"]
    q8 = zsq.quantize(resnet20, "squant", 8, 8, protocol="fixed", progress=False)
    q2 = zsq.quantize(resnet20, "squant", 2, 2, protocol="fixed", progress=False)
    t8 = zsq.evaluate(q8, TEST_TAR, limit=1000, progress=False)["top1"]
    t2 = zsq.evaluate(q2, TEST_TAR, limit=1000, progress=False)["top1"]
    assert abs(t8 - fp) <= 0.5, (t8, fp)
    assert t2 < t8 - 20


def test_dfq_prestep_chains_before_another_recipe(resnet20, real_batch):
    """--pre dfq before a synthesizing recipe: the FP model it hands on keeps its BatchNorms (the
    synthesizer matches their statistics) and its function."""
    fp = PRE_STEPS["dfq"](copy.deepcopy(resnet20), {})
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fp.modules()) == 19
    x, _ = real_batch
    with torch.inference_mode():
        torch.testing.assert_close(fp(x), resnet20(x), **TOL)
    q = zsq.quantize(resnet20, "minmax-noise", 8, 8, protocol="fixed", pre="dfq", budget="smoke", progress=False)
    assert record_of(q).result["recipe"]["pre"] == "dfq"
    with torch.inference_mode():
        agree = (q(x).argmax(1) == resnet20(x).argmax(1)).float().mean()
    assert agree >= 0.9


@pytest.mark.parametrize("protocol", ["fixed", "genie-native"])
def test_save_load_round_trip(protocol, resnet20, real_batch, tmp_path):
    """Bias corrections of unfolded layers go into the following BN's running mean, so the saved
    state dict matches the architecture zsq.load rebuilds."""
    q = zsq.quantize(resnet20, "udfc", 4, 4, protocol=protocol, progress=False)
    zsq.save(q, tmp_path / "out")
    q2 = zsq.load(tmp_path / "out")
    x, _ = real_batch
    with torch.inference_mode():
        assert torch.equal(q(x), q2(x))
