"""Quantization core: fake-quant, LSQ gradients, observers, BN folding, protocol placement."""

from __future__ import annotations

import torch
from torch import nn
import pytest

from zsq.quant.fake import fake_quant, qparams_from_range, qrange
from zsq.quant.fold import fold_bn
from zsq.quant.modules import QuantConv2d, Quantizer
from zsq.quant.observers import Observer, lp_search
from zsq.quant.protocol import apply_protocol
from zsq.ptq.calibrate import calibrate
from zsq.spec import PROTOCOLS, LayerPolicy
from zsq.errors import BadValueError


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_levels_and_error(bits, symmetric):
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(bits)) * 8 - (4 if symmetric else 3)
    s, z, qmin, qmax = qparams_from_range(x.min(), x.max(), bits, symmetric, signed=True)
    y = fake_quant(x, s, z, qmin, qmax)
    assert y.unique().numel() <= 2**bits
    assert y.unique().numel() >= 2**bits - 2  # the range is actually used
    # inside the range the error is at most half a step
    assert (y - x).abs().max() <= s * 0.5 + 1e-6
    # zero is exact
    assert fake_quant(torch.zeros(1), s, z, qmin, qmax).item() == 0.0


def test_16_bit_is_nearly_lossless():
    x = torch.randn(1000)
    s, z, qmin, qmax = qparams_from_range(x.min(), x.max(), 16, False, True)
    torch.testing.assert_close(fake_quant(x, s, z, qmin, qmax), x, rtol=0, atol=1e-3)


def test_per_channel_weight_levels(resnet20):
    conv = resnet20.layer2[0].conv1
    for bits in (2, 3, 4):
        q = QuantConv2d.from_float(conv, bits, "minmax", per_channel=True)
        w = q.qweight().detach().reshape(conv.out_channels, -1)
        levels = [row.unique().numel() for row in w]
        assert max(levels) <= 2**bits
        assert min(levels) >= 2  # every channel still carries information


def test_lsq_gradient_matches_finite_differences():
    """Autograd's step-size gradient equals LSQ's: with the rounding residual r0 frozen at s0, the
    surrogate f(s) = s * (clamp(x/s + z) + r0 - z) is piecewise smooth, so central differences
    match the straight-through gradient."""
    torch.manual_seed(0)
    x = torch.randn(500, dtype=torch.float64) * 2
    qmin, qmax, z = 0, 15, torch.tensor(8.0, dtype=torch.float64)
    s0 = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    y = fake_quant(x, s0, z, qmin, qmax)
    g_auto = torch.autograd.grad(y.sum(), s0)[0]

    v0 = torch.clamp(x / s0 + z, qmin, qmax).detach()
    r0 = torch.round(v0) - v0

    def surrogate(s):
        return (s * (torch.clamp(x / s + z, qmin, qmax) + r0 - z)).sum()

    eps = 1e-7
    g_fd = (surrogate(s0.detach() + eps) - surrogate(s0.detach() - eps)) / (2 * eps)
    torch.testing.assert_close(g_auto, g_fd, rtol=1e-5, atol=1e-5)
    # and per element: LSQ's closed form
    s = s0.detach()
    inside = (x / s + z > qmin) & (x / s + z < qmax)
    closed = torch.where(inside, torch.round(x / s) - x / s,
                         torch.where(x / s + z < qmin, qmin - z, qmax - z)).sum()
    torch.testing.assert_close(g_auto, closed, rtol=1e-6, atol=1e-6)


def test_lsq_learnable_quantizer_trains():
    q = Quantizer(4)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)).abs()
    q.set_range(torch.zeros(1), torch.tensor([10.0]))  # far too wide
    step = q.make_learnable()
    opt = torch.optim.Adam([step], lr=0.05)
    err0 = (q(x) - x).pow(2).mean().item()
    for _ in range(100):
        opt.zero_grad()
        (q(x) - x).pow(2).mean().backward()
        opt.step()
    assert (q(x) - x).pow(2).mean().item() < 0.3 * err0


def test_lp_search_beats_minmax_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((1, 20000))
    lo, hi = lp_search(x, 4, symmetric=False, signed=True)
    s, z, qmin, qmax = qparams_from_range(lo, hi, 4, False, True)
    s0, z0, _, _ = qparams_from_range(x.min(1).values, x.max(1).values, 4, False, True)
    e_lp = (fake_quant(x, s[:, None], z[:, None], qmin, qmax) - x).pow(2).mean()
    e_mm = (fake_quant(x, s0[:, None], z0[:, None], qmin, qmax) - x).pow(2).mean()
    assert e_lp < e_mm


def test_observers_minmax_percentile_ema():
    o = Observer("minmax")
    o.update(torch.tensor([0.0, 1.0]))
    o.update(torch.tensor([-2.0, 0.5]))
    lo, hi = o.range(8, False, True)
    assert lo.item() == -2.0 and hi.item() == 1.0
    p = Observer("percentile", percentile=99.0)
    p.update(torch.cat([torch.linspace(0, 1, 1000), torch.tensor([100.0])]))
    assert p.range(8, False, False)[1].item() < 2.0
    e = Observer("ema", momentum=0.9)
    e.update(torch.tensor([0.0, 1.0]))
    e.update(torch.tensor([0.0, 3.0]))
    hi = e.range(8, False, False)[1].item()
    assert 1.0 < hi < 3.0  # bias-corrected EMA lies between the two maxima


def test_bn_folding_matches_unfolded(resnet20, real_batch):
    import copy

    x, _ = real_batch
    m = copy.deepcopy(resnet20)
    with torch.no_grad():
        ref = resnet20(x)
        pairs = fold_bn(m, x[:2])
        out = m(x)
    assert len(pairs) == 19
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# -- protocol placement: the hand-written ResNet-20 table of benchmarks.md ------------------------
# Each entry: tensor -> expected bits ("FP" = not quantized). Observed through forward hooks at W3A3,
# so 3-bit tensors have <= 8 levels, 8-bit ones 9..256 levels and FP ones > 256 distinct values.
W, A = 3, 3


def _table(protocol: str) -> dict[str, object]:
    lowstem = protocol == "qat"
    t = {
        "input": "FP",
        "conv1.weight": W if lowstem else 8,
        "relu.out": A if lowstem else 8,
        "linear.weight": W if lowstem else 8,
        "logits": "FP",
    }
    for s in range(1, 4):
        for b in range(3):
            blk = f"layer{s}.{b}"
            t[f"{blk}.conv1.weight"] = W
            t[f"{blk}.conv2.weight"] = W
            t[f"{blk}.relu1.out"] = A
            t[f"{blk}.conv2.out"] = "FP"  # conv2 output before the add is not quantized
            last = s == 3 and b == 2
            t[f"{blk}.relu2.out"] = (A if lowstem else 8) if last else A
    return t


def _observe(q: nn.Module, x: torch.Tensor) -> dict[str, int]:
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in q.named_modules():
        if name == "conv1":
            hooks.append(mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("input", a[0])))
        if name.endswith(("relu", "relu1", "relu2")) or name == "pool":
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(f"{n}.out", o)))
        if name.endswith("conv2"):
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(f"{n}.out", o)))
    with torch.no_grad():
        seen["logits"] = q(x)
        for name, mod in q.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                w = mod.qweight() if hasattr(mod, "qweight") else mod.weight
                seen[f"{name}.weight"] = w
    for h in hooks:
        h.remove()
    out = {}
    for k, v in seen.items():
        if k.endswith(".weight"):  # levels per output channel
            out[k] = max(r.unique().numel() for r in v.reshape(v.shape[0], -1))
        else:
            out[k] = v.unique().numel()
    return out


def _bits_of(levels: int, key: str) -> object:
    if levels <= 2**3:
        return 3
    if levels <= 256:
        return 8
    return "FP"


@pytest.mark.parametrize("protocol", ["ptq", "qat", "fixed"])
def test_protocol_table_resnet20(protocol, resnet20, real_batch):
    x, _ = real_batch
    q = apply_protocol(resnet20, PROTOCOLS[protocol], W, A)
    calibrate(q, x)
    levels = _observe(q, x)
    observed = {k: _bits_of(v, k) for k, v in levels.items()}
    expected = _table(protocol)
    # pooled features are not re-quantized: averaging creates values off the input's grid
    assert levels["pool.out"] > 4 * levels["layer3.2.relu2.out"]
    wrong = {k: (observed.get(k), v) for k, v in expected.items() if observed.get(k) != v}
    assert not wrong, f"(observed, expected): {wrong}"
    bn = [m for m in q.modules() if isinstance(m, nn.BatchNorm2d)]
    assert (len(bn) == 0) == PROTOCOLS[protocol].fold_bn


def test_protocol_genie_native_resnet20(resnet20, real_batch):
    """Genie's convention: quantizers at layer inputs, shared with shortcuts; BN unfolded."""
    x, _ = real_batch
    q = apply_protocol(resnet20, PROTOCOLS["genie-native"], W, A)
    calibrate(q, x)
    seen = {}
    hooks = [q.linear.register_forward_pre_hook(lambda m, a: seen.__setitem__("linear.in", a[0])),
             q.layer3[2].relu2.register_forward_hook(lambda m, a, o: seen.__setitem__("last.out", o))]
    obs = _observe(q, x)
    with torch.no_grad():
        q(x)
        lin_in = q.linear.aq_in(seen["linear.in"])
    for h in hooks:
        h.remove()
    assert _bits_of(obs["input"], "") == "FP"
    assert _bits_of(obs["conv1.weight"], "") == 8 and _bits_of(obs["linear.weight"], "") == 8
    assert _bits_of(obs["relu.out"], "") == 8  # second layer's input at 8 bits
    assert _bits_of(obs["layer1.0.relu1.out"], "") == 3
    assert _bits_of(obs["layer2.1.relu2.out"], "") == 3  # block output = next block's input and shortcut
    assert _bits_of(obs["layer3.2.relu2.out"], "") == "FP"  # only the pooled FC input is quantized
    assert _bits_of(lin_in.unique().numel(), "") == 8
    assert any(isinstance(m, nn.BatchNorm2d) for m in q.modules())


def test_layer_policy_overrides(resnet20, real_batch):
    x, _ = real_batch
    pol = LayerPolicy(keep_fp=("layer1.0.conv1",), layer_bits=LayerPolicy.parse_layer_bits(["layer2.*.conv2=W2A8"]))
    q = apply_protocol(resnet20, PROTOCOLS["ptq"], 4, 4, policy=pol)
    calibrate(q, x)
    assert not isinstance(q.layer1[0].conv1, QuantConv2d)
    assert q.layer2[1].conv2.wq.bits == 2
    assert q.layer2[1].relu1.aq_out.bits == 8  # conv2's input
    with pytest.raises(BadValueError):
        apply_protocol(resnet20, PROTOCOLS["ptq"], 4, 4, policy=LayerPolicy(keep_fp=("nope*",)))
    with pytest.raises(BadValueError):
        LayerPolicy.parse_layer_bits(["layer1=W4"])


def test_act_levels_through_hooks(resnet20, real_batch):
    x, _ = real_batch
    for a in (2, 4):
        q = apply_protocol(resnet20, PROTOCOLS["qat"], 4, a)
        calibrate(q, x)
        outs = []
        hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o)) for n, m in q.named_modules()
                 if n.endswith("aq_out")]
        with torch.no_grad():
            q(x)
        for h in hooks:
            h.remove()
        assert len(outs) == 19
        assert all(o.unique().numel() <= 2**a for o in outs)


def test_fold_bn_check_catches_a_changed_output(monkeypatch):
    """fold_bn's check compares the folded model's output to the original's and refuses a change."""
    import zsq.quant.fold as fold

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.c(x))

    x = torch.randn(2, 3, 8, 8)
    assert fold.fold_bn(M().eval(), x) == [("c", "bn")]
    monkeypatch.setattr(fold, "fold_conv_bn", lambda conv, bn: conv.weight.data.mul_(2))  # a wrong fold
    with pytest.raises(AssertionError, match="BN folding changed the model's output"):
        fold.fold_bn(M().eval(), x)
