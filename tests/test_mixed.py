"""Mixed precision without data (zsq.quant.mixed, issue 38): the exact allocation against brute force, the
budget never exceeded, infeasible budgets refused with the smallest feasible one, both sensitivities
against slow references on a tiny model, and a run per quantizer kind under --wbits-avg 3."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from zsq.errors import BadValueError
from zsq.quant.mixed import (InfeasibleBudgetError, MixedConfig, brute_force, hutchinson_traces, mixed_policy,
                             search, solve, _probe_model)
from zsq.spec import PROTOCOLS, LayerPolicy


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_solve_equals_brute_force_on_random_tables():
    g = torch.Generator().manual_seed(0)
    cands = (2, 3, 4, 6, 8)
    for trial in range(6):
        names = [f"l{i}" for i in range(5)]
        n = {k: int(torch.randint(10, 500, (1,), generator=g)) for k in names}
        # decreasing in bits like real sensitivities, with noise so that ties are rare
        sens = {k: {b: float(torch.rand(1, generator=g)) * 2.0 ** (-b) for b in cands} for k in names}
        cost = {k: {b: n[k] * b for b in cands} for k in names}
        total = sum(n.values())
        for avg in (2, 2.4, 3, 3.5, 5, 8):
            cap = math.floor(avg * total)
            bits, val = solve(sens, cost, cap)
            ref, ref_val = brute_force(sens, cost, cap)
            assert sum(cost[k][b] for k, b in bits.items()) <= cap
            assert val == pytest.approx(ref_val, rel=1e-9, abs=1e-15)
    # over budget for every allocation: no solution
    assert solve(sens, cost, 2 * total - 1)[0] is None


@pytest.mark.parametrize("budget", [{"wbits_avg": 2.3}, {"wbits_avg": 3}, {"wbits_avg": 4.5}, {"size_mb": 0.00055}])
def test_search_optimal_and_within_budget_on_tiny_model(tiny, images, budget):
    cfg = MixedConfig(**budget, n_images=24)
    r = search(tiny, PROTOCOLS["qat"], cfg, images=images, cache=False)
    assert set(r.bits) == {"conv1", "conv2", "fc"} and not r.pinned
    names = list(r.bits)
    total = sum(r.params.values())
    # every allocation tried: none inside the budget has a smaller total sensitivity
    best = math.inf
    for combo in itertools.product(cfg.candidates, repeat=len(names)):
        bits = dict(zip(names, combo))
        if "wbits_avg" in budget:
            ok = sum(r.params[k] * b for k, b in bits.items()) <= budget["wbits_avg"] * total
        else:
            qb = r.q_bytes - sum((r.params[k] * r.bits[k] + 7) // 8 for k in names)
            ok = qb + sum((r.params[k] * b + 7) // 8 for k, b in bits.items()) <= budget["size_mb"] * 1e6
        if ok:
            best = min(best, sum(r.sensitivity[k][b] for k, b in bits.items()))
    assert r.objective == pytest.approx(best, rel=1e-9, abs=1e-15)
    if "wbits_avg" in budget:
        assert r.wbits_avg <= budget["wbits_avg"]
    else:
        assert r.q_bytes <= budget["size_mb"] * 1e6
    # the model quantized with the searched bits has exactly the counted weight memory
    from zsq.api import model_size
    from zsq.quant.protocol import apply_protocol

    q = apply_protocol(tiny, PROTOCOLS["qat"], 4, 8, policy=mixed_policy(None, r.bits))
    assert {n: q.get_submodule(n).wq.bits for n in names} == r.bits
    assert model_size(tiny, q)["q_bytes"] == r.q_bytes


def test_infeasible_budget_names_the_smallest_feasible_one(tiny, images):
    with pytest.raises(InfeasibleBudgetError, match=r"infeasible.*--wbits-avg 2 "):
        search(tiny, PROTOCOLS["qat"], MixedConfig(wbits_avg=1.9), images=images, cache=False)
    with pytest.raises(InfeasibleBudgetError) as e:
        search(tiny, PROTOCOLS["qat"], MixedConfig(size_mb=0.0001), images=images, cache=False)
    smallest = float(str(e.value).split("--size ")[2].split(" MB")[0])
    r = search(tiny, PROTOCOLS["qat"], MixedConfig(size_mb=smallest, n_images=8), images=images, cache=False)
    assert r.q_bytes <= smallest * 1e6  # feasible, as the message says
    with pytest.raises(BadValueError, match="exactly one"):
        MixedConfig(wbits_avg=3, size_mb=1)
    with pytest.raises(BadValueError, match="--mp-bits"):
        MixedConfig(wbits_avg=3, candidates="2,9")


def _ref_fake_quant(w, bits):
    """Per-output-channel asymmetric min-max fake quantization, written out."""
    dims = tuple(range(1, w.dim()))
    lo = w.amin(dim=dims, keepdim=True).clamp(max=0)
    hi = w.amax(dim=dims, keepdim=True).clamp(min=0)
    qmax = 2**bits - 1
    s = ((hi - lo) / qmax).clamp_min(torch.finfo(torch.float32).eps)
    z = torch.clamp(torch.round(-lo / s), 0, qmax)
    return (torch.clamp(torch.round(w / s) + z, 0, qmax) - z) * s


def test_kl_sensitivity_matches_slow_reference(tiny, images):
    r = search(tiny, PROTOCOLS["qat"], MixedConfig(wbits_avg=8, n_images=24, batch_size=7), images=images,
               cache=False)
    with torch.no_grad():
        p = F.softmax(tiny(images), 1)
        for name in ("conv1", "conv2", "fc"):
            for b in (2, 3, 4, 6, 8):
                m = copy.deepcopy(tiny)
                layer = m.get_submodule(name)
                layer.weight.copy_(_ref_fake_quant(layer.weight, b))
                lq = F.log_softmax(m(images), 1)
                kl = float((p * (p.log() - lq)).sum(1).mean())
                assert r.sensitivity[name][b] == pytest.approx(kl, rel=1e-3, abs=1e-7), (name, b)


def test_hutchinson_trace_matches_exact_hessian(tiny, images, one_thread):
    """Each layer's estimate against the trace of its exact Hessian block (torch.autograd.functional.hessian).
    One layer per call: the search probes all layers at once, which adds the zero-mean cross terms
    v_l^T H_lm v_m to each estimate (unbiased, noisier); alone, 200 probes land within 10%."""
    q, layers, _ = _probe_model(tiny, PROTOCOLS["qat"], LayerPolicy())
    with torch.no_grad():
        y = tiny(images).argmax(1)
    for name in ("conv1", "conv2", "fc"):
        est = hutchinson_traces(q, {name: layers[name]}, images, None, samples=200, batch_size=24, seed=0)[name]
        m = copy.deepcopy(tiny)
        w0 = m.get_submodule(name).weight.detach().clone()

        def loss(flat):
            ws = {k: v.detach() for k, v in m.named_parameters()}
            ws[f"{name}.weight"] = flat.view_as(w0)
            return F.cross_entropy(torch.func.functional_call(m, ws, (images,)), y)

        exact = float(torch.diagonal(torch.autograd.functional.hessian(loss, w0.flatten())).sum())
        assert est == pytest.approx(exact, rel=0.1), name


def _levels_ok(q, bits):
    from zsq.quant.modules import weight_codes

    for name, b in bits.items():
        m = q.get_submodule(name)
        assert m.wq.bits == b, name
        codes = weight_codes(m.wq, m.weight.detach())
        assert int(codes.max()) < 2**b and int(codes.min()) >= 0


class Small(nn.Module):
    """Five quantized layers: under ptq the first conv and the linear are pinned, three are searched."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu4 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.linear = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        x = self.relu4(self.conv4(self.relu3(self.conv3(x))))
        return self.linear(self.flat(self.pool(x)))


@pytest.mark.parametrize("kind", ["calib", "squant", "adaround", "qat-kd"])
def test_wbits_avg_3_per_quantizer_kind(kind, one_thread):
    """Every kind of quantizer (calibration, synthesis-free, reconstruction, QAT) follows the searched bits."""
    import zsq
    from zsq.models import load_model
    from zsq.record import record_of

    torch.manual_seed(0)
    model = load_model(Small().eval())
    args = {"calib": dict(recipe="minmax-noise", synth_overrides={"n_images": 16}),
            "squant": dict(recipe="squant"),
            "adaround": dict(recipe="minmax-noise", quant="adaround", synth_overrides={"n_images": 16},
                             hparams={"iters": 2, "batch_size": 8}),
            "qat-kd": dict(recipe="minmax-noise", quant="qat-kd", synth_overrides={"n_images": 16},
                           hparams={"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "ema_epochs": 0})}[kind]
    q = zsq.quantize(model, w_bits=4, a_bits=8, protocol="ptq", budget="smoke", progress=False,
                     mixed={"wbits_avg": 3, "n_images": 8}, **args)
    rec = record_of(q).result["mixed"]
    assert rec["data"] == ("gaussian" if kind == "squant" else "synthetic")
    bits = rec["bits"]
    assert set(bits) == {"conv2", "conv3", "conv4"}  # ptq pins conv1 and linear at 8
    _levels_ok(q, bits)
    n = {k: q.get_submodule(k).weight.numel() for k in bits}
    assert sum(n[k] * b for k, b in bits.items()) <= 3 * sum(n.values())
    assert q.conv1.wq.bits == 8 and q.linear.wq.bits == 8
    acts = record_of(q).layout.acts  # activation bits stay the protocol's: A8 everywhere here
    assert {a.bits for a in acts} == {8}


def _zsq(capsys, *args) -> tuple[int, str]:
    """``zsq ARGS`` in this process (the CLI's own main: its exit code and its output)."""
    from zsq.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def test_cli_budget_errors(tmp_path, capsys, one_thread):
    rc, out = _zsq(capsys, "quantize", "cifar10_resnet20", "--recipe", "squant", "--w", "3", "--wbits-avg", "3",
                   "-o", str(tmp_path / "a"))
    assert rc == 2 and "--w and --wbits-avg" in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1
    rc, out = _zsq(capsys, "quantize", "cifar10_resnet20", "--recipe", "squant", "--wbits-avg", "1.5", "-q", "-o",
                   str(tmp_path / "b"))
    assert rc == 2 and "infeasible" in out and "--wbits-avg 2 " in out and "Traceback" not in out
    assert not (tmp_path / "b" / "zsq.json").exists()


def test_mixed_output_saves_loads_and_reports(resnet20, tmp_path, one_thread):
    """zsq.json records the search and the weight-only policy (NAME=W3); zsq.load rebuilds the same bits and
    outputs; the report's bits.png is drawn from that zsq.json."""
    import json

    import zsq
    from zsq.api import load, save
    from zsq.report import _bits_png

    q = zsq.quantize(resnet20, "minmax-noise", 4, 8, protocol="ptq", budget="smoke", progress=False,
                     synth_overrides={"n_images": 16},
                     mixed={"size_mb": 0.1, "n_images": 4, "candidates": (2, 4, 8)})
    out = save(q, tmp_path / "out")
    meta = json.loads((out / "zsq.json").read_text())
    m = meta["mixed"]
    assert m["budget"] == {"kind": "size_mb", "value": 0.1} and meta["size"]["q_bytes"] == m["q_bytes"] <= 100_000
    assert all(meta["policy"]["layer_bits"][k] == f"W{b}" for k, b in m["bits"].items())
    q2 = load(out)
    assert {k: q2.get_submodule(k).wq.bits for k in m["bits"]} == m["bits"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(q2(x), q(x), rtol=1e-5, atol=1e-5)
    assert _bits_png(meta, tmp_path / "bits.png") and (tmp_path / "bits.png").stat().st_size > 0
    assert not _bits_png({**meta, "mixed": None}, tmp_path / "none.png")  # uniform outputs: no bits.png
