"""The QAT methods' student terms (issue 8: IntraQ, HAST, SynQ, PLF, TexQ) in the shared engine, the
synthesis labels reaching the trainer, and the method recipes.

Small on purpose (2 shared cores): ResNet-20 on batches of 8 images, a few steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zsq.errors import BadValueError
from zsq.qat.engine import (QATConfig, QATInterrupted, QATTrainer, channel_attention, feature_layers, grad_cam,
                            lowpass_filter, masked_ce, normalized_entropy, qat_finetune)
from zsq.quant.protocol import apply_protocol
from zsq.record import record_of
from zsq.spec import PROTOCOLS

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "assets" / "cifar10-jpeg" / "test.tar"


def _fixed_set_qat_recipes() -> list[str]:
    """The registered recipes that fine-tune on a fixed synthetic set (the ``qat-kd`` quantizer)."""
    from zsq.api import list_methods

    return [m["name"] for m in list_methods() if m["quant"] == "qat-kd"]


#: the method recipes on the fixed-set loop (the qat-zeroq baseline aside)
QAT_METHODS = [n for n in _fixed_set_qat_recipes() if n != "qat-zeroq"]

#: every method term on at once (the resume test); each alone in TERMS
ALL_ON = {"ce_weight": 0.5, "ce_select": "reliable", "ce_tau": 0.9, "fa_weight": 1000.0, "adv_eps": 0.01,
          "lpf_d0": 80.0, "cam_weight": 50.0, "mixup_weight": 20.0}
TERMS = {
    "ce": {"ce_weight": 1.0},
    "fa": {"fa_weight": 1000.0},
    "adv": {"adv_eps": 0.01},
    "cam": {"cam_weight": 50.0},
    "mix": {"mixup_weight": 20.0},
}


def _images(n=16, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _labels(n=16, seed=1):
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


def _student(model, proto="qat"):
    return apply_protocol(model, PROTOCOLS[proto], 4, 4)


def _tensors(model):
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _cfg(**hp):
    return QATConfig(**{"epochs": 2, "steps_per_epoch": 1, "batch_size": 8, "lr": 1e-3, "ema_epochs": 1,
                        "augment": False, **hp})


def _warm(model, **hp):
    """A trainer after its one EMA warm-up step (activation ranges set), hooks on; and its batch 0."""
    tr = QATTrainer(_student(model), model, _images(), _cfg(**hp), labels=_labels(), progress=False)
    return tr, tr._draw(1, 0)


def _losses(model, **hp):
    tr, b = _warm(model, **hp)
    with tr.hooked():
        tr._step(0, 0)
        return {k: float(v.detach()) for k, v in tr.losses(b.x, b.labels, idx=b.idx, mix=b.mix).items()}


# -- each term: present when on, exactly absent when off ------------------------------------------------

def test_terms_off_are_absent(resnet20):
    base = _losses(resnet20)
    assert set(base) == {"kd", "total"} and base["total"] == pytest.approx(20.0 * base["kd"], rel=1e-6)
    # fields that only shape a term that is off change nothing, bit for bit
    idle = _losses(resnet20, adv_weight=5.0, mixup_alpha=0.3, ce_tau=0.2, ce_target="teacher")
    assert idle == base


@pytest.mark.parametrize("term", list(TERMS))
def test_each_term_adds_to_the_loss_when_on(resnet20, term):
    base = _losses(resnet20)
    on = _losses(resnet20, **TERMS[term])
    assert set(on) == {"kd", "total", term}
    assert on["kd"] == base["kd"]  # same batch, same ranges: only the term is new
    assert on[term] > 0 and on["total"] > base["total"]


def test_lowpass_changes_the_batch_only_when_on(resnet20):
    tr, b = _warm(resnet20, lpf_d0=80.0)
    ref, rb = _warm(resnet20)
    assert torch.equal(b.idx, rb.idx)
    # D0 = 80 is given for 224 px: on 32 px images it is 80 * 32 / 224
    torch.testing.assert_close(b.x, lowpass_filter(tr.images[b.idx], 80.0 * 32 / 224), rtol=0, atol=1e-6)
    assert torch.equal(rb.x, ref.images[rb.idx]) and not torch.allclose(b.x, rb.x, atol=1e-2)


def test_clip_images_clamps_the_set_to_the_pixel_range(resnet20):
    from zsq.synth.pixel import pixel_range

    x = _images() * 4  # |x| up to ~15: far outside CIFAR's normalised [-2, 2.1]
    lo, hi = pixel_range(resnet20, 3)
    tr = QATTrainer(_student(resnet20), resnet20, x, _cfg(clip_images=True), progress=False)
    ref = QATTrainer(_student(resnet20), resnet20, x, _cfg(), progress=False)
    assert torch.equal(ref.images, x)  # off by default: the set as synthesized
    assert torch.equal(tr.images, torch.maximum(torch.minimum(x, hi), lo))
    assert (tr.images == hi).any() and (tr.images == lo).any()
    inside = (x >= lo) & (x <= hi)
    assert torch.equal(tr.images[inside], x[inside])  # in-range pixels untouched


# -- hand computations ----------------------------------------------------------------------------------

def test_channel_attention_hand_values():
    a = torch.tensor([[[[1.0, 3.0]], [[2.0, -2.0]]]])  # (1, 2, 1, 2): mean squares 5 and 4
    torch.testing.assert_close(channel_attention(a), torch.tensor([[5.0, 4.0]]) / math.sqrt(41.0))


def test_feature_alignment_is_the_sum_over_block_branches(resnet20):
    names = feature_layers(resnet20)
    assert names == [f"layer{s}.{b}.bn2" for s in (1, 2, 3) for b in range(3)]  # the branch before the add
    tr, b = _warm(resnet20, fa_weight=1000.0)
    seen = {"t": [], "s": []}
    hooks = [m.get_submodule(n).register_forward_hook(lambda mod, i, o, k=k: seen[k].append(o.detach().clone()))
             for k, m in (("t", tr.teacher), ("s", tr.q)) for n in names]
    with tr.hooked():
        tr._step(0, 0)
        seen["t"].clear(), seen["s"].clear()
        fa = tr.losses(b.x)["fa"]
    for h in hooks:
        h.remove()
    ref = sum((channel_attention(s) - channel_attention(t)).pow(2).mean() for s, t in zip(seen["s"], seen["t"]))
    torch.testing.assert_close(fa.detach(), ref, rtol=1e-5, atol=0)


def test_lowpass_filter_hand_values():
    n = torch.arange(8.0)
    wave = torch.cos(2 * math.pi * 2 * n / 8)[None, None, None, :].expand(1, 1, 8, 8)  # 2 cycles along x
    # a cosine at 2 bins from DC is scaled by exp(-2^2 / (2 d0^2)); a constant passes unchanged
    torch.testing.assert_close(lowpass_filter(wave, 2.0), wave * math.exp(-0.5), rtol=0, atol=1e-6)
    flat = torch.full((2, 3, 8, 8), 0.7)
    torch.testing.assert_close(lowpass_filter(flat, 1.0), flat, rtol=0, atol=1e-6)


def test_grad_cam_hand_values():
    # logits = W @ spatial means of 2 channels; top class 0: d logit_0 / dA_k = W[0, k] / 4 everywhere
    act = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 0.0]]]], requires_grad=True)
    w = torch.tensor([[2.0, -1.0], [0.0, 0.0]])
    logits = act.mean((2, 3)) @ w.t()
    cam = grad_cam(logits, act, (2, 2))
    # channel weights 0.5 and -0.25 -> clamped to 1e-10: map = relu(0.5 * A_0 + 1e-10 * A_1), min-max scaled
    m = 0.5 * act.detach()[0, 0] + 1e-10 * act.detach()[0, 1]
    torch.testing.assert_close(cam[0, 0], (m - m.min()) / (m.max() - m.min() + 1e-10), rtol=1e-6, atol=1e-7)
    cam.sum().backward()  # differentiable through the activation
    assert act.grad is not None


def test_masked_ce_and_entropy_hand_values():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    ce = -torch.log_softmax(logits, 1)[torch.arange(3), y]
    torch.testing.assert_close(masked_ce(logits, y, torch.tensor([1.0, 0.0, 1.0])), (ce[0] + ce[2]) / 3)
    torch.testing.assert_close(masked_ce(logits, y), ce.mean())
    torch.testing.assert_close(normalized_entropy(logits)[2], torch.tensor(1.0))  # uniform over 2 classes
    assert float(normalized_entropy(torch.tensor([[30.0, 0.0, 0.0]]))) < 1e-6


def test_selective_ce_keeps_only_easy_samples(resnet20):
    """SynQ: CE on the synthesis label only where the teacher's 1 - p_y < tau, summed / batch size."""
    tr, b = _warm(resnet20, ce_weight=1.0, ce_select="easy", ce_tau=0.5)
    with torch.inference_mode():
        t = tr.teacher(b.x)
    y = b.labels.clone()
    y[::2] = t.argmax(1)[::2]  # half the labels agree with the teacher, some of those confidently
    with tr.hooked():
        tr._step(0, 0)
        ce = tr.losses(b.x, y)["ce"]
        with torch.no_grad():
            s = tr.q(b.x)
    keep = (1 - torch.softmax(t, 1)[torch.arange(len(y)), y]) < 0.5
    assert 0 < int(keep.sum()) < len(y)
    ref = F.cross_entropy(s, y, reduction="none")[keep].sum() / len(y)
    torch.testing.assert_close(ce.detach(), ref, rtol=1e-5, atol=1e-6)


def test_ce_targets_labels_or_teacher(resnet20):
    tr, b = _warm(resnet20, ce_weight=1.0)
    with tr.hooked():
        tr._step(0, 0)
        with_labels = tr.losses(b.x, b.labels)["ce"]
        fallback = tr.losses(b.x)["ce"]  # no labels: the teacher's argmax
        with torch.no_grad():
            s, t = tr.q(b.x), tr.teacher(b.x)
    torch.testing.assert_close(with_labels.detach(), F.cross_entropy(s, b.labels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fallback.detach(), F.cross_entropy(s, t.argmax(1)), rtol=1e-5, atol=1e-6)


def test_plf_filter_is_entropy_and_agreement(resnet20):
    images = _images()
    with torch.inference_mode():
        t = resnet20(images)
    labels = _labels()
    labels[:8] = t.argmax(1)[:8]
    tr = QATTrainer(_student(resnet20), resnet20, images, _cfg(ce_weight=1.0, ce_select="reliable", ce_tau=0.9),
                    labels=labels, progress=False)
    ref = (normalized_entropy(t) < 0.9) & (t.argmax(1) == labels)
    assert torch.equal(tr.reliable, ref.float()) and 0 < int(ref.sum())
    tr2 = QATTrainer(_student(resnet20), resnet20, images, _cfg(ce_weight=1.0, ce_select="reliable", ce_tau=0.9,
                                                                ce_target="teacher"), labels=labels, progress=False)
    assert torch.equal(tr2.reliable, (normalized_entropy(t) < 0.9).float())  # no label to agree with


# -- determinism and resume -------------------------------------------------------------------------------

def test_resume_with_every_term_on_equals_uninterrupted(resnet20, tmp_path):
    images, labels = _images(24, seed=4), _labels(24, seed=5)
    cfg = QATConfig(epochs=3, steps_per_epoch=2, batch_size=8, lr=1e-3, ema_epochs=1, **ALL_ON)
    kw = dict(seed=3, progress=False, labels=labels)
    full = qat_finetune(_student(resnet20), resnet20, images, cfg, **kw)
    qat = record_of(full).methods["qat"]
    assert {"ce", "fa", "adv", "cam", "mix"} <= set(qat["epochs"][0]) and qat["labels"]
    with pytest.raises(QATInterrupted):
        qat_finetune(_student(resnet20), resnet20, images, cfg, ckpt_dir=tmp_path, stop_at=(1, 1), **kw)
    resumed = qat_finetune(_student(resnet20), resnet20, images, cfg, ckpt_dir=tmp_path, resume=True, **kw)
    assert record_of(resumed).methods["qat"]["steps_run"] == 3
    a, b = _tensors(full), _tensors(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    other = _labels(24, seed=6)  # other labels: other settings
    with pytest.raises(BadValueError, match="other settings"):
        qat_finetune(_student(resnet20), resnet20, images, cfg, ckpt_dir=tmp_path, resume=True,
                     **{**kw, "labels": other})


# -- bad settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("hp,needle", [
    ({"ce_target": "oracle"}, "ce_target"),
    ({"ce_select": "easy"}, "ce_weight"),
    ({"ce_weight": 1.0, "ce_select": "some"}, "ce_select"),
    ({"ce_weight": 1.0, "ce_tau": 1.5}, "ce_tau"),
    ({"fa_weight": -1.0}, "loss weights"),
    ({"adv_eps": -0.01}, "adv_eps"),
    ({"mixup_weight": 1.0, "mixup_alpha": 0.0}, "mixup_alpha"),
])
def test_bad_method_hparams(hp, needle):
    with pytest.raises(BadValueError, match=needle):
        _cfg(**hp)


def test_bad_labels_and_models_without_blocks(resnet20):
    with pytest.raises(BadValueError, match="labels"):
        QATTrainer(_student(resnet20), resnet20, _images(), _cfg(), labels=_labels(15), progress=False)
    with pytest.raises(BadValueError, match="labels"):
        QATTrainer(_student(resnet20), resnet20, _images(), _cfg(), labels=torch.rand(16), progress=False)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 30 * 30, 10)).eval()
    with pytest.raises(BadValueError, match="residual blocks"):
        QATTrainer(_student(plain), plain, _images(), _cfg(fa_weight=1.0), progress=False)


# -- labels from the synthetic set to the trainer -----------------------------------------------------------

def _labelled_set(directory, images, labels):
    from zsq.data.shards import combined_sha256, shard_name, write_meta, write_shard

    directory.mkdir(parents=True)
    sha = write_shard(directory / shard_name(0), {"images": images, "labels": labels})
    write_meta(directory, {"shards": [{"file": shard_name(0), "sha256": sha, "n": len(labels), "index": 0}],
                           "n_images": len(labels), "sha256": combined_sha256([sha])})
    return directory


def test_labels_flow_from_the_synthetic_set_to_the_quantizer(resnet20, tmp_path, monkeypatch):
    import zsq
    from zsq.recipes import QUANTIZERS

    images, labels = _images(16), _labels(16)
    d = _labelled_set(tmp_path / "set", images, labels)
    seen = []

    def capture(ctx):
        seen.append(ctx.labels)
        return _student(ctx.model)

    monkeypatch.setitem(QUANTIZERS._items, "calib", capture)
    zsq.quantize(resnet20, recipe="zeroq", synthetic=str(d), progress=False)
    assert torch.equal(seen[-1], labels)
    zsq.quantize(resnet20, recipe="zeroq", calib=str(CIFAR_TEST), calib_n=16, progress=False)
    assert seen[-1] is None  # real calibration data: no synthesis labels
    # the QAT quantizer hands them on: CE on the labels
    q = zsq.quantize(resnet20, recipe="qat-zeroq", synthetic=str(d), budget="smoke", progress=False,
                     hparams={"ce_weight": 1.0, "batch_size": 8})
    assert record_of(q).methods["qat"]["labels"] and "ce" in record_of(q).methods["qat"]["epochs"][0]


# -- the recipes ------------------------------------------------------------------------------------------

def test_method_recipes_registered_with_one_default_budget():
    from zsq.bench.suites import QAT_RECIPES
    from zsq.recipes import RECIPES

    assert QAT_RECIPES == _fixed_set_qat_recipes() and len(QAT_METHODS) >= 7  # the bench suite runs every one
    base = RECIPES["qat-zeroq"].budgets["default"]
    synths = {"intraq": "intraq", "hast": "hast", "synq": "hast", "plf": "hast", "texq": "texq",
              "deepinversion": "deepinversion", "gznq": "gznq"}
    for name in QAT_METHODS:
        r = RECIPES[name]
        assert (r.kind, r.protocol, r.quant, r.synth) == ("QAT", "qat", "qat-kd", synths[name]), name
        assert r.budgets["default"]["n_images"] == base["n_images"] == 5120
        assert r.budgets["default"]["quant"] == base["quant"], name
        for b in ("smoke", "default", "paper"):
            QATConfig.from_hparams({**r.hparams, **r.budgets[b].get("quant", {})})  # a valid config
    assert RECIPES["synq"].budgets["default"]["beta"] == 0.1 and RECIPES["synq"].budgets["paper"]["gamma"] == 0.5
    assert RECIPES["hast"].hparams["fa_weight"] == 1000.0 and RECIPES["hast"].hparams["adv_eps"] == 0.01
    for name, quant in (("kw", "calib"), ("dsg", "calib"), ("mixmix", "brecq")):
        assert RECIPES[name].kind == "PTQ" and RECIPES[name].quant == quant
    assert RECIPES["dsg"].protocol == RECIPES["zeroq"].protocol and RECIPES["mixmix"].protocol == "ptq"


def test_hast_smoke_end_to_end(smoke_qmodel):
    """The record and accuracy of the shared smoke run (tests/test_contract.py checks its levels and round trip)."""
    import zsq

    q = smoke_qmodel("hast")
    res = record_of(q).result
    assert res["recipe"]["synth"] == "hast" and res["recipe"]["hparams"]["fa_weight"] == 1000.0
    qat = record_of(q).methods["qat"]
    assert qat["labels"] and qat["steps_run"] == 4
    assert {"kd", "fa", "adv"} <= set(qat["epochs"][0]) and "ce" not in qat["epochs"][0]
    top1 = zsq.evaluate(q, str(CIFAR_TEST), limit=300, progress=False)["top1"]
    assert top1 > 20.0, top1


def test_diverged_qat_gives_a_clear_error(resnet20):
    """The fixed-set loop shares the generator loop's check (the engine's update step): a non-finite loss
    is a one-line error naming the lr, not a crash inside fake quantization on NaN weights."""
    from zsq.errors import BadValueError

    tr = QATTrainer(_student(resnet20), resnet20, _images(), _cfg(lr=1e30, epochs=4), progress=False)
    with pytest.raises(BadValueError, match=r"diverged; lower the student lr \(now 1e\+30, batch 8\)"):
        tr.run()
