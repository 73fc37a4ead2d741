"""Block reconstruction (AdaRound / BRECQ / QDrop / Genie-M) and the Genie-D synthesizer.

Small on purpose (2 shared cores): a few steps per unit, a few dozen images.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from zsq.errors import BadValueError
from zsq.ptq.reconstruct import (ReconConfig, ReconInterrupted, Reconstructor, find_units, method_passes,
                                 reconstruct)
from zsq.quant.adaround import AdaRoundQuantizer, rectified_sigmoid, rectified_sigmoid_inverse, round_regularizer
from zsq.quant.modules import QUANT_LAYERS, Quantizer
from zsq.quant.protocol import apply_protocol
from zsq.record import record_of
from zsq.spec import PROTOCOLS

CIFAR_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "cifar10-jpeg" / "test.tar"


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=32, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _qmodel(model, proto="genie-native", w=4, a=4):
    return apply_protocol(model, PROTOCOLS[proto], w, a, w_observer="mse", a_observer="mse")


# -- AdaRound primitives ------------------------------------------------------------------------------

def test_rectified_sigmoid_hand_values():
    v = torch.tensor([0.0, math.log(3.0), -math.log(3.0), 10.0, -10.0])
    # sigmoid = 0.5, 0.75, 0.25, ~1, ~0 ; h = clamp(1.2 s - 0.1, 0, 1)
    expect = torch.tensor([0.5, 0.8, 0.2, 1.0, 0.0])
    torch.testing.assert_close(rectified_sigmoid(v), expect, rtol=0, atol=1e-6)
    h = torch.tensor([0.0, 0.3, 0.5, 0.9])
    torch.testing.assert_close(rectified_sigmoid(rectified_sigmoid_inverse(h)), h, rtol=0, atol=1e-6)


def test_round_regularizer_hand_values():
    h = torch.tensor([0.0, 1.0, 0.5, 0.75])
    # 1 - |2h-1|^beta: 0, 0, 1, 1 - 0.5^beta
    assert float(round_regularizer(h, 2.0)) == pytest.approx(0 + 0 + 1 + 0.75, abs=1e-6)
    assert float(round_regularizer(h, 20.0)) == pytest.approx(2 - 0.5**20, abs=1e-6)


def test_adaround_starts_at_weight_and_bakes_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    wq = Quantizer(3, per_channel=True, channels=6, observer="mse")
    wq.init_from_tensor(conv.weight.detach())
    ada = AdaRoundQuantizer.from_quantizer(wq, conv.weight, learn_scale=True)
    # soft quantizer at init = the weight itself wherever it is inside the clipping range
    soft = ada()
    inside = (conv.weight / ada.scale + ada.zero_point >= 0) & (conv.weight / ada.scale + ada.zero_point <= 7)
    torch.testing.assert_close(soft[inside], conv.weight.detach()[inside], rtol=1e-5, atol=1e-6)
    # hard rounding at init = round-to-nearest of the plain quantizer
    torch.testing.assert_close(ada.hard_weight(), wq(conv.weight.detach()), rtol=0, atol=1e-6)
    with torch.no_grad():
        ada.v.add_(torch.randn_like(ada.v))
        ada.scale.mul_(1.05)
    hard = ada.hard_weight()
    ada.bake(conv, wq)
    assert torch.equal(wq(conv.weight), hard)
    assert torch.equal(conv.weight.detach(), hard)


def test_relative_step_learning_moves_every_channel_by_the_same_fraction():
    """``relative``: the step is s_0 exp(u) with u learnt, so one Adam step of lr eta changes a tiny and a
    large channel step alike by about exp(+-eta); ``absolute`` (Genie's) moves both by about eta, i.e. the
    tiny one by a large fraction of itself. At init both modes are round-to-nearest; bake stays exact."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight[0].mul_(1e-3)  # channel 0: a step ~1000x smaller than channel 1's
    wq = Quantizer(8, per_channel=True, channels=2, observer="minmax")
    wq.init_from_tensor(conv.weight.detach())
    x = torch.randn(16, 2, 4, 4)
    target = conv(x).detach() * 1.3
    change = {}
    for mode in ("absolute", "relative"):
        ada = AdaRoundQuantizer.from_quantizer(wq, conv.weight, learn_scale=mode)
        s0 = ada.scale.detach().clone()
        torch.testing.assert_close(ada.hard_weight(), wq(conv.weight.detach()), rtol=0, atol=0)
        opt = torch.optim.Adam([ada.step_param], lr=1e-3)
        loss = (torch.nn.functional.conv2d(x, ada()) - target).pow(2).sum()
        loss.backward()
        opt.step()
        change[mode] = (ada.scale.detach() / s0).flatten()
        hard = ada.hard_weight()
        conv2 = nn.Conv2d(2, 2, 1, bias=False)
        wq2 = Quantizer(8, per_channel=True, channels=2, observer="minmax")
        wq2.init_from_tensor(conv.weight.detach())
        ada.bake(conv2, wq2)
        assert torch.equal(wq2(conv2.weight), hard)
    rel = change["relative"]
    torch.testing.assert_close(rel, torch.full_like(rel, math.exp(1e-3)), rtol=0, atol=1e-5)  # both grew by eta
    # absolute: the small channel's step moved by lr = 1e-3, i.e. by a large fraction of itself
    assert change["absolute"][0] - 1 > 100 * (change["absolute"][1] - 1) > 0
    with pytest.raises(BadValueError):
        AdaRoundQuantizer.from_quantizer(wq, conv.weight, learn_scale="log")
    with pytest.raises(BadValueError):
        ReconConfig(w_scale_param="log")


def test_drop_prob_is_train_only():
    q = Quantizer(2)
    q.set_range(torch.tensor(0.0), torch.tensor(3.0))
    x = torch.rand(10000) * 3
    q.drop_prob = 0.5
    q.eval()
    assert torch.equal(q(x), q.int_repr(x) * q.scale)
    q.train()
    y = q(x)
    kept_fp = (y == x).float().mean()
    assert 0.45 < float(kept_fp) < 0.56
    q.drop_prob = 0.0
    assert torch.equal(q(x), q.int_repr(x) * q.scale)


# -- units and ownership -------------------------------------------------------------------------------

def test_units_and_quantizer_ownership(resnet20):
    x = _images(2)
    q = _qmodel(resnet20, "genie-native")
    units, orphans = find_units(q, x, "block", "input")
    names = [u.name for u in units]
    assert names == ["conv1"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["linear"]
    by = {u.name: u for u in units}
    # genie-native: a block owns the quantizer of its input (the previous block's output hook) and its inner one
    assert [n for n, _ in by["layer1.0"].owned] == ["relu.aq_out", "layer1.0.relu1.aq_out"]
    assert [n for n, _ in by["layer1.0"].inputs] == ["relu.aq_out"]
    assert [n for n, _ in by["layer2.0"].inputs] == ["layer1.2.relu2.aq_out"]
    assert [n for n, _ in by["linear"].owned] == ["linear.aq_in"] and not by["linear"].inputs
    assert not by["conv1"].owned and not orphans

    q = _qmodel(resnet20, "ptq")
    units, orphans = find_units(q, x, "block", "output", skip_first=True)
    by = {u.name: u for u in units}
    assert by["conv1"].skip and not any(u.skip for u in units[1:])
    # ptq: a block owns its inner and output quantizers; the stem output is applied at layer1.0's input
    assert [n for n, _ in by["layer1.0"].owned] == ["relu.aq_out", "layer1.0.relu1.aq_out", "layer1.0.relu2.aq_out"]
    assert [n for n, _ in by["layer1.1"].owned] == ["layer1.1.relu1.aq_out", "layer1.1.relu2.aq_out"]
    assert [n for n, _ in by["layer3.2"].owned][-1] == "layer3.2.relu2.aq_out"
    assert not by["linear"].owned and not orphans
    # every activation quantizer has exactly one owner
    owned = [n for u in units for n, _ in u.owned]
    assert sorted(owned) == sorted(a.name for a in record_of(q).layout.acts)


# -- reconstruction ------------------------------------------------------------------------------------

def _block_err(fp, qm, images, name):
    """Output MSE of block ``name`` (each model fed its own inputs), per element."""
    outs = {}

    def grab(key):
        def hook(m, a, o):
            outs[key] = o
        return hook

    h1 = fp.get_submodule(name).register_forward_hook(grab("fp"))
    h2 = qm.get_submodule(name).register_forward_hook(grab("q"))
    with torch.inference_mode():
        fp(images)
        qm(images)
    h1.remove()
    h2.remove()
    return float((outs["q"] - outs["fp"]).pow(2).mean())


def test_block_reconstruction_lowers_heldout_error(resnet20):
    from zsq.synth import synthesize

    data = synthesize(resnet20, "genie", budget="smoke", seed=0, n_images=64,
                      overrides={"batch_size": 64}, progress=False).images
    train, held = data[:48], data[48:]
    errs = {}
    for iters in (0, 100):
        # 2-bit weights so rounding matters; larger lrs than the paper's so 100 steps suffice
        q = _qmodel(resnet20, "genie-native", 2, 4)
        cfg = ReconConfig(iters=iters, batch_size=16, lr_round=1e-2, lr_w_scale=1e-3, lr_a_scale=1e-3)
        reconstruct(q, train, [cfg], seed=0, progress=False, only=["layer1.0"])
        errs[iters] = _block_err(resnet20, q, held, "layer1.0")
    assert errs[100] < 0.8 * errs[0], errs


def test_hard_rounding_leaves_weights_on_grid(resnet20):
    q = _qmodel(resnet20, "ptq", 3, 4)
    reconstruct(q, _images(32), method_passes("genie-m", {"iters": 30, "batch_size": 8}, protocol_name="ptq"),
                seed=0, progress=False, only=["layer1.0", "linear"])
    checked = 0
    for name, m in q.named_modules():
        if not isinstance(m, QUANT_LAYERS) or not name.startswith(("layer1.0.", "linear")):
            continue  # layers of units not reconstructed keep their FP weights (quantized on the fly)
        checked += 1
        assert isinstance(m.wq, Quantizer) and not isinstance(m.wq.scale, nn.Parameter)
        w = m.weight.detach()
        assert torch.equal(m.wq(w), w), name  # already on the grid: quantizing changes nothing
        codes = m.wq.int_repr(w)
        assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** m.wq.bits - 1
        per_ch = max(len(torch.unique(c)) for c in codes.reshape(codes.shape[0], -1))
        assert per_ch <= 2 ** m.wq.bits
    assert checked == 3
    for n, a in q.named_modules():
        if isinstance(a, Quantizer) and not n.endswith("wq"):
            assert a.mode == "quant" and a.initialized and a.drop_prob == 0.0 and not a.training


def _all_tensors(model):
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("method,proto,hp", [("genie-m", "genie-native", {}), ("brecq", "ptq", {"iters_a": 4}),
                                            ("genie-m", "genie-native", {"w_scale_param": "relative"})])
def test_resume_equals_uninterrupted(resnet20, tmp_path, method, proto, hp):
    images = _images(24, seed=1)
    passes = method_passes(method, {"iters": 6, "batch_size": 8, **hp}, protocol_name=proto)
    kw = dict(seed=3, progress=False)

    full = reconstruct(_qmodel(resnet20, proto), images, passes, **kw)
    total = record_of(full).methods["recon"]["steps_run"]

    ck = tmp_path / "ckpt"
    stop = (len(passes) - 1, 3, 4)  # last pass, unit 3 (three units finished), mid-unit after step 4
    with pytest.raises(ReconInterrupted):
        reconstruct(_qmodel(resnet20, proto), images, passes, ckpt_dir=ck, stop_at=stop, **kw)
    assert (ck / "recon.pt").is_file()
    resumed = reconstruct(_qmodel(resnet20, proto), images, passes, ckpt_dir=ck, resume=True, **kw)
    # completed steps were skipped: only the rest of unit 3 and the later units ran
    assert 0 < record_of(resumed).methods["recon"]["steps_run"] < total
    a, b = _all_tensors(full), _all_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_settings(resnet20, tmp_path):
    images = _images(16)
    passes = [ReconConfig(iters=2, batch_size=8)]
    with pytest.raises(ReconInterrupted):
        reconstruct(_qmodel(resnet20), images, passes, ckpt_dir=tmp_path, stop_at=(0, 1, 1), progress=False)
    with pytest.raises(BadValueError, match="other settings"):
        reconstruct(_qmodel(resnet20), images, [ReconConfig(iters=3, batch_size=8)], ckpt_dir=tmp_path,
                    resume=True, progress=False)


def test_needs_images(resnet20):
    with pytest.raises(BadValueError, match="calibration images"):
        Reconstructor(_qmodel(resnet20), None, [ReconConfig()])


# -- Genie-D and the recipe ------------------------------------------------------------------------------

def test_genie_synth_needs_batchnorm():
    from zsq.synth import synthesize

    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))
    with pytest.raises(BadValueError) as e:
        synthesize(net, "genie", budget="smoke", image_size=32, progress=False)
    assert "BatchNorm" in str(e.value) and "\n" not in str(e.value)


def test_genie_batches_reproducible(resnet20):
    from zsq.synth import get_synthesizer
    from zsq.synth.base import batch_generator

    s = get_synthesizer("genie", "smoke", {"iters": 3, "batch_size": 4})
    kw = dict(batch_size=4, image_shape=(3, 32, 32))
    a = s.make_batch(resnet20, 1, batch_generator(0, 1), **kw)
    b = s.make_batch(resnet20, 1, batch_generator(0, 1), **kw)
    c = s.make_batch(resnet20, 2, batch_generator(0, 2), **kw)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    # the swing hooks are gone afterwards: the model is untouched
    assert all(not m._forward_pre_hooks for m in resnet20.modules())


def test_genie_label_term_makes_confident_class_balanced_images(resnet20):
    """``ce_weight`` (an ablation, off by default): the teacher is surer of the images and they spread
    over the classes of the balanced target labels."""
    from zsq.synth import get_synthesizer
    from zsq.synth.base import batch_generator

    kw = dict(batch_size=10, image_shape=(3, 32, 32))
    out = {}
    for w in (0.0, 1.0):
        s = get_synthesizer("genie", "smoke", {"iters": 30, "batch_size": 10, "ce_weight": w})
        x = s.make_batch(resnet20, 0, batch_generator(0, 0), **kw)
        with torch.inference_mode():
            out[w] = resnet20(x).softmax(1)
    assert out[1.0].max(1).values.mean() > out[0.0].max(1).values.mean() + 0.2
    assert len(set(out[1.0].argmax(1).tolist())) >= 8 > len(set(out[0.0].argmax(1).tolist()))
    with pytest.raises(BadValueError, match="ce_weight"):
        get_synthesizer("genie", "smoke", {"ce_weight": -1})


def test_genie_out_affine_frees_the_input_channels(resnet20):
    """``out_affine`` (an ablation, off by default): the generator's last BN learns a scale / shift, so
    the input channels leave mean 0 / std 1 and the first BN layer's term falls below Genie-D's."""
    from zsq.synth import get_synthesizer
    from zsq.synth.base import batch_generator
    from zsq.synth.losses import BNStatsLoss

    first, off = {}, {}
    for aff in (False, True):
        s = get_synthesizer("genie", "smoke", {"iters": 30, "batch_size": 16, "out_affine": aff})
        x = s.make_batch(resnet20, 0, batch_generator(0, 0), batch_size=16, image_shape=(3, 32, 32))
        with BNStatsLoss.preset("genie", resnet20) as bns, torch.no_grad():
            resnet20(x)
            first[aff] = float(bns.layer_losses()[0])
        # how far the channels are from mean 0 / std 1 (bf16 generator forwards round the std by ~2e-3)
        off[aff] = max(x.mean((0, 2, 3)).abs().max().item(), (x.std((0, 2, 3)) - 1).abs().max().item())
    assert off[False] < 5e-3 and off[True] > 2e-2
    assert first[True] < 0.9 * first[False]


def test_genie_ablation_settings_leave_the_cache_key_at_their_default(resnet20):
    """``ablation()`` fields at their default are left out of the synthetic set's key (sets cached
    before they existed stay valid); set, they change it."""
    from zsq.synth import get_synthesizer
    from zsq.synth.base import model_fingerprint, synthetic_key

    fp, shape = model_fingerprint(resnet20), (3, 32, 32)
    keys = {name: synthetic_key(fp, get_synthesizer("genie", "default", ov), "default", 0, shape)
            for name, ov in (("plain", None), ("zero", {"ce_weight": 0.0, "out_affine": False}),
                             ("ce", {"ce_weight": 1.0}), ("aff", {"out_affine": True}))}
    assert keys["plain"] == keys["zero"] and len({keys["plain"], keys["ce"], keys["aff"]}) == 3
    cfg = get_synthesizer("genie", "default").config
    assert "ce_weight" in cfg.to_dict() and "ce_weight" not in cfg.key_dict()


def test_genie_recipe_smoke_end_to_end(smoke_qmodel):
    """The reconstruction record and accuracy of the shared smoke run (tests/test_contract.py checks its
    levels and its save / load round trip)."""
    import zsq

    q = smoke_qmodel("genie")
    assert record_of(q).result["recipe"]["synth"] == "genie" and record_of(q).result["protocol"] == "genie-native"
    assert len(record_of(q).methods["recon"]["units"]) == 11
    top1 = zsq.evaluate(q, str(CIFAR_TEST), limit=1000, progress=False)["top1"]
    assert top1 > 60.0, top1


def test_fused_lsq_drop_matches_reference():
    from zsq.ptq.reconstruct import _LSQDrop, drop_mask
    from zsq.quant.fake import fake_quant

    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5) * 2).requires_grad_(True)
    s = torch.tensor([0.3], requires_grad=True)
    zp = torch.tensor(2.0)
    m = drop_mask(x, 0.5)
    assert 0.3 < float(m.mean()) < 0.7 and set(m.unique().tolist()) <= {0.0, 1.0}
    g = torch.randn_like(x)
    for mask in (None, m):
        out = _LSQDrop.apply(x, s.reshape(()), zp, 0, 7, mask)
        gx, gs = torch.autograd.grad((out * g).sum(), (x, s))
        ref = fake_quant(x, s.reshape(()), zp, 0, 7)
        if mask is not None:
            ref = torch.where(mask.bool(), x, ref)
        rx, rs = torch.autograd.grad((ref * g).sum(), (x, s))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs, rs, rtol=1e-4, atol=1e-5)


def test_corrupted_checkpoint_is_refused(resnet20, tmp_path):
    """A checkpoint whose bytes changed (disk error, truncation) fails its SHA-256 on --resume."""
    from zsq.errors import ChecksumError

    images = _images(16)
    passes = [ReconConfig(iters=4, batch_size=8)]
    with pytest.raises(ReconInterrupted):
        reconstruct(_qmodel(resnet20), images, passes, ckpt_dir=tmp_path, stop_at=(0, 2, 1), progress=False)
    ck = tmp_path / "recon.pt"
    raw = bytearray(ck.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ck.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="SHA-256"):
        reconstruct(_qmodel(resnet20), images, passes, ckpt_dir=tmp_path, resume=True, progress=False)
    ck.write_bytes(bytes(raw[: len(raw) // 3]))  # truncated: the trailer is gone
    with pytest.raises(ChecksumError, match="no checksum"):
        reconstruct(_qmodel(resnet20), images, passes, ckpt_dir=tmp_path, resume=True, progress=False)
