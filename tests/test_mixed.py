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


# -------------------------------------------------------------------------------------------------
# --bops: activation bits searched too
# -------------------------------------------------------------------------------------------------
def test_solve_joint_equals_brute_force_on_random_tables():
    """Joint (w, a) allocation under a BOPs cap: shared inputs, fixed inputs and pinned weights, against brute force."""
    from zsq.quant.mixed import brute_force_joint, solve_joint

    g = torch.Generator().manual_seed(0)
    wc, ac = (2, 4, 8), (4, 6, 8)
    for trial in range(3):
        names = [f"l{i}" for i in range(5)]
        macs = {k: int(torch.randint(100, 5000, (1,), generator=g)) for k in names}
        wopts = {k: {b: float(torch.rand(1, generator=g)) * 2.0 ** (-b) for b in wc} for k in names[:4]}
        wopts["l4"] = {8: 0.0}  # a pinned W8 layer whose input is searched
        asens = {s: {b: float(torch.rand(1, generator=g)) * 2.0 ** (-b) for b in ac} for s in ("s0", "s1", "s2")}
        ains = {"l0": 32, "l1": "s0", "l2": "s0", "l3": "s1", "l4": "s2"}  # l1 and l2 read the same tensor
        lo = sum(macs[k] * min(wopts[k]) * (min(asens[a]) if isinstance(a, str) else a) for k, a in ains.items())
        hi = sum(macs[k] * max(wopts[k]) * (max(asens[a]) if isinstance(a, str) else a) for k, a in ains.items())
        for f in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
            cap = int(lo + f * (hi - lo))
            wb, ab, val = solve_joint(wopts, ains, asens, macs, cap)
            rw, ra, ref = brute_force_joint(wopts, ains, asens, macs, cap)
            a_of = {k: (ab[a] if isinstance(a, str) else a) for k, a in ains.items()}
            assert sum(macs[k] * wb[k] * a_of[k] for k in names) <= cap
            assert val == pytest.approx(ref, rel=1e-9, abs=1e-15)
        assert solve_joint(wopts, ains, asens, macs, lo - 1)[0] is None


class Branch(nn.Module):
    """Two convs read relu1's output (one activation quantizer, one searched width for both)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.relu1(self.conv1(x))
        return self.fc(self.flat(self.pool(self.relu2(self.conv2(h) + self.conv3(h)))))


def test_bops_search_optimal_within_budget_and_applied(images):
    """--bops on a tiny branching model (qat: nothing pinned): the allocation is the brute-force optimum of
    its own sensitivity tables, within the budget, and the model laid out with its policy has exactly those
    weight and input bits and BOPs; an infeasible budget names the smallest feasible one, which is feasible."""
    from zsq.quant.mixed import brute_force_joint
    from zsq.quant.protocol import apply_protocol
    from zsq.record import record_of

    torch.manual_seed(0)
    model = Branch().eval()
    base = dict(n_images=24, candidates=(2, 4, 8), act_candidates=(4, 8))
    r = search(model, PROTOCOLS["qat"], MixedConfig(bops_g=0.015, **base), images=images, cache=False, a_bits=6)
    rec = r.acts["record"]
    assert rec["act_bits"].keys() == {"relu1.aq_out"}  # conv2 and conv3 share it; conv1 reads the image, fc the pool
    assert rec["abits"]["conv2"] == rec["abits"]["conv3"] == rec["act_bits"]["relu1.aq_out"]
    assert rec["abits"]["conv1"] == 32 and rec["abits"]["fc"] == 32
    layers = rec["bops"]["layers"]
    assert rec["bops"]["bops"] == sum(v["macs"] * v["w"] * v["a"] for v in layers.values()) <= 0.015e9
    wopts = r.sensitivity
    asens = {s: {int(b): v for b, v in t.items()} for s, t in rec["act_sensitivities"].items()}
    ains = {n: ("relu1.aq_out" if n in ("conv2", "conv3") else 32) for n in wopts}
    macs = {n: v["macs"] for n, v in layers.items()}
    _, _, best = brute_force_joint(wopts, ains, asens, macs, 15_000_000)
    assert r.objective == pytest.approx(best, rel=1e-9, abs=1e-15)
    q = apply_protocol(model, PROTOCOLS["qat"], 4, 6, policy=mixed_policy(None, r.entries()))
    assert {n: q.get_submodule(n).wq.bits for n in r.bits} == r.bits
    assert q.relu1.aq_out.bits == rec["act_bits"]["relu1.aq_out"]
    assert q.relu2.aq_out.bits == 6  # not a layer's input: --a
    with pytest.raises(InfeasibleBudgetError) as e:
        search(model, PROTOCOLS["qat"], MixedConfig(bops_g=0.0001, **base), images=images, cache=False)
    smallest = float(str(e.value).split("--bops ")[2].split(" G")[0])
    r = search(model, PROTOCOLS["qat"], MixedConfig(bops_g=smallest, **{**base, "n_images": 8}), images=images,
               cache=False)
    assert r.acts["record"]["bops"]["bops"] <= smallest * 1e9
    assert set(r.bits.values()) == {2} and set(r.acts["record"]["act_bits"].values()) == {4}
    with pytest.raises(BadValueError, match="exactly one"):
        MixedConfig(wbits_avg=3, bops_g=1)
    with pytest.raises(BadValueError, match="--mp-abits"):
        MixedConfig(bops_g=1, act_candidates="4,16")


@pytest.mark.parametrize("kind", ["calib", "squant", "adaround", "qat-kd"])
def test_bops_per_quantizer_kind(kind, one_thread):
    """Every kind of quantizer follows the searched weight and input-activation bits of a --bops search."""
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
                     mixed={"bops_g": 0.02, "n_images": 8, "candidates": (2, 4, 8), "act_candidates": (4, 8)}, **args)
    rec = record_of(q).result["mixed"]
    assert rec["budget"] == {"kind": "bops_g", "value": 0.02} and rec["bops"]["bops"] <= 20_000_000
    _levels_ok(q, rec["bits"])
    # ptq pins conv2's input (first_a8) and the classifier's; conv3 and conv4 read searched inputs
    assert set(rec["act_bits"]) == {"relu2.aq_out", "relu3.aq_out"}
    acts = {a.name: a.bits for a in record_of(q).layout.acts}
    assert all(acts[s] == b for s, b in rec["act_bits"].items()) and acts["relu1.aq_out"] == 8
    assert min(rec["act_bits"].values()) < 8  # W2A8 everywhere is 23.6 M BOPs: some input must drop
    for s, b in rec["act_bits"].items():
        assert q.get_submodule(s).bits == b


SMALL_PY = '''
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU()
        self.pool, self.flat, self.linear = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu3(self.conv3(self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))))
        return self.linear(self.flat(self.pool(x)))


def small():
    return Small().eval()
'''


def test_cli_bops(tmp_path, capsys, one_thread):
    """zsq quantize --bops: exclusive with --w / --wbits-avg, --mp-abits needs it, an infeasible budget is one
    line (exit 2) with the smallest feasible one, and a run records the searched bits and BOPs in zsq.json."""
    import json

    from zsq.api import load as zsq_load

    (tmp_path / "small.py").write_text(SMALL_PY)
    model = [f"{tmp_path / 'small.py'}:small", "--input-size", "3,16,16", "--recipe", "squant", "--protocol", "ptq",
             "-q"]
    for extra, words in ((["--w", "4", "--bops", "1"], "--w and --bops"),
                         (["--wbits-avg", "3", "--bops", "1"], "exactly one"),
                         (["--wbits-avg", "3", "--mp-abits", "4,8"], "--mp-abits"),
                         (["--bops", "0.00001"], "infeasible")):
        rc, out = _zsq(capsys, "quantize", *model, *extra, "-o", str(tmp_path / "x"))
        assert rc == 2 and words in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "x" / "zsq.json").exists()
    smallest = float(out.split("--bops ")[2].split(" G")[0])
    rc, out = _zsq(capsys, "quantize", *model, "--bops", f"{smallest * 1.5:.6f}", "--mp-bits", "2,4,8",
                   "--mp-abits", "4,8", "--a", "8", "-o", str(tmp_path / "o"))
    assert rc == 0, out
    meta = json.loads((tmp_path / "o" / "zsq.json").read_text())
    m = meta["mixed"]
    assert m["budget"] == {"kind": "bops_g", "value": float(f"{smallest * 1.5:.6f}")}
    assert m["bops"]["bops"] <= m["budget"]["value"] * 1e9 and m["act_candidates"] == [4, 8]
    assert set(m["act_bits"]) == {"relu2.aq_out"}  # conv2's input is ptq's first A8, the classifier's its last
    pol = meta["policy"]["layer_bits"]
    assert pol["conv3"] == f"W{m['bits']['conv3']}A{m['act_bits']['relu2.aq_out']}" and pol["conv2"] == f"W{m['bits']['conv2']}"
    q = zsq_load(tmp_path / "o")  # rebuilt from zsq.json's WxAy policy: the same input bits
    assert all(q.get_submodule(s).bits == b for s, b in m["act_bits"].items())
    assert {k: q.get_submodule(k).wq.bits for k in m["bits"]} == m["bits"]
    from zsq.report import _bits_png

    assert _bits_png(meta, tmp_path / "bits.png") and (tmp_path / "bits.png").stat().st_size > 0  # with input marks
