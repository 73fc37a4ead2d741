"""The QAT engine (distillation fine-tuning) and the qat-zeroq recipe.

Small on purpose (2 shared cores): a few steps of small batches on ResNet-20.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from zsq.errors import BadValueError
from zsq.qat.engine import (QATConfig, QATInterrupted, kd_loss, qat_finetune, quantize_qat,
                            random_resized_crop_flip, step_seed)
from zsq.quant.modules import QUANT_LAYERS, Quantizer
from zsq.quant.protocol import apply_protocol
from zsq.record import record_of
from zsq.spec import PROTOCOLS

REPO = Path(__file__).resolve().parents[1]
CIFAR_TEST = REPO.parent / "shared" / "assets" / "cifar10-jpeg" / "test.tar"


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=24, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _student(model, w=4, a=4, proto="qat"):
    return apply_protocol(model, PROTOCOLS[proto], w, a)


def _tensors(model):
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _act_quantizers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer) and not n.endswith("wq")]


# -- pieces ---------------------------------------------------------------------------------------------

def test_kd_loss_hand_values():
    s = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # T = 1: KL(softmax(t) || softmax(s)) = 0 for row 0; row 1: p = (a, b), q = (b, a), a = sigmoid(-2)
    a, b = torch.sigmoid(torch.tensor(-2.0)), torch.sigmoid(torch.tensor(2.0))
    row1 = a * torch.log(a / b) + b * torch.log(b / a)
    torch.testing.assert_close(kd_loss(s, t, 1.0), row1 / 2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kd_loss(s, t, 1.0, "mean"), row1 / 4, rtol=1e-5, atol=1e-7)
    # T = 20 against the float64 definition; for large T, T^2 KL -> mean_c (d - mean_c d)^2 / 2 with
    # d = t - s: rows 0 and 4 / 2 = 2, batch mean 1 (the T^2 factor keeps the scale)
    p, q = torch.softmax(t.double() / 20, 1), torch.softmax(s.double() / 20, 1)
    ref = 400 * (p * (p / q).log()).sum(1).mean()
    torch.testing.assert_close(kd_loss(s, t, 20.0).double(), ref, rtol=1e-4, atol=0)
    assert abs(float(ref) - 1.0) < 0.02


def test_crop_flip_identity_and_determinism():
    x = _images(6)
    # scale (1, 1) with aspect 1: no crop; flips only
    g = torch.Generator().manual_seed(0)
    y = random_resized_crop_flip(x, g, (1.0, 1.0), ratio=(1.0, 1.0))
    g = torch.Generator().manual_seed(0)
    flipped = torch.rand(6, 5, generator=g)[:, 4] < 0.5
    for i in range(6):
        ref = x[i].flip(-1) if flipped[i] else x[i]
        torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-5)
    a = random_resized_crop_flip(x, torch.Generator().manual_seed(step_seed(0, 1, 2)))
    b = random_resized_crop_flip(x, torch.Generator().manual_seed(step_seed(0, 1, 2)))
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert step_seed(0, 1, 2) != step_seed(0, 2, 1)


# -- the loop -------------------------------------------------------------------------------------------

def test_kd_steps_lower_kl_on_fixed_batch(resnet20, real_batch):
    """Twelve KD steps on one batch lower the student-teacher KL there; the same steps with lr = 0 (same
    EMA warm-up step, so the same activation ranges; weights untouched) do not."""
    x = real_batch[0][:32]
    kls = {}
    for lr in (0.0, 3e-5):
        cfg = QATConfig(epochs=1, steps_per_epoch=13, batch_size=32, lr=lr, augment=False)
        q = qat_finetune(_student(resnet20, 4, 4), resnet20, x, cfg, progress=False)
        with torch.inference_mode():
            kls[lr] = float(kd_loss(q(x), resnet20(x), cfg.temperature))
        assert record_of(q).methods["qat"]["steps_run"] == 13 and record_of(q).methods["qat"]["ema_steps"] == 1
        assert record_of(q).methods["qat"]["epochs"][0]["ema_steps"] == 1
    assert kls[3e-5] < 0.7 * kls[0.0], kls


def test_bn_statistics_frozen_and_parameters_trained(resnet20):
    teacher_w = resnet20.layer1[0].conv1.weight.detach().clone()
    q = _student(resnet20)
    bn0 = {k: v.clone() for k, v in q.state_dict().items() if "running_" in k}
    w0 = q.layer1[0].conv1.weight.detach().clone()
    g0 = q.layer1[0].bn1.weight.detach().clone()
    cfg = QATConfig(epochs=1, steps_per_epoch=2, batch_size=8, lr=1e-3, ce_weight=1.0, bns_weight=0.1)
    q = qat_finetune(q, resnet20, _images(16), cfg, progress=False)
    for k, v in bn0.items():
        assert torch.equal(q.state_dict()[k], v), k  # eval mode throughout: running stats untouched
    assert not torch.equal(q.layer1[0].conv1.weight, w0) and not torch.equal(q.layer1[0].bn1.weight, g0)
    assert set(record_of(q).methods["qat"]["epochs"][0]) >= {"kd", "ce", "bns", "total"}
    assert torch.equal(resnet20.layer1[0].conv1.weight, teacher_w)  # the FP model is left alone
    with pytest.raises(BadValueError, match="BatchNorm"):
        qat_finetune(_student(resnet20, proto="ptq"), resnet20, _images(8), QATConfig(bns_weight=0.1), progress=False)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_final_model_is_on_its_grids(resnet20, real_batch, precision):
    cfg = QATConfig(epochs=2, steps_per_epoch=2, batch_size=16, lr=1e-4, precision=precision)
    q = qat_finetune(_student(resnet20, 3, 3), resnet20, _images(32), cfg, progress=False)
    # weight ranges = per-channel min-max of the final weights; at most 2^3 codes per channel
    for name, m in q.named_modules():
        if isinstance(m, QUANT_LAYERS):
            w = m.weight.detach().reshape(m.weight.shape[0], -1)
            lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
            torch.testing.assert_close(m.wq.scale, (hi - lo) / 7, rtol=1e-6, atol=1e-9)
            codes = m.wq.int_repr(m.weight.detach()).reshape(w.shape[0], -1)
            assert max(len(torch.unique(c)) for c in codes) <= 8, name
    # every activation quantizer calibrated, frozen, and its output on at most 2^3 levels
    seen = {}
    hooks = [aq.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n, aq in _act_quantizers(q)]
    with torch.inference_mode():
        q(real_batch[0])
    for h in hooks:
        h.remove()
    assert len(seen) == 19
    for n, aq in _act_quantizers(q):
        assert aq.mode == "quant" and aq.initialized and aq.observer is None, n
        assert len(torch.unique(seen[n])) <= 8, n


# -- resume ---------------------------------------------------------------------------------------------

def _resume_cfg():
    # 3 epochs x 2 steps; EMA ranges during epoch 0 only
    return QATConfig(epochs=3, steps_per_epoch=2, batch_size=8, lr=1e-3, ema_epochs=1, ce_weight=0.5)


def test_resume_at_epoch_boundary_equals_uninterrupted(resnet20, tmp_path):
    images, cfg = _images(24, seed=1), _resume_cfg()
    full = qat_finetune(_student(resnet20), resnet20, images, cfg, seed=3, progress=False)
    with pytest.raises(QATInterrupted):
        qat_finetune(_student(resnet20), resnet20, images, cfg, seed=3, progress=False, ckpt_dir=tmp_path,
                     stop_at=(1, 2))  # after the warm-up epoch and one training epoch (optimizer state)
    assert (tmp_path / "qat.pt").is_file()
    resumed = qat_finetune(_student(resnet20), resnet20, images, cfg, seed=3, progress=False, ckpt_dir=tmp_path,
                           resume=True)
    assert record_of(resumed).methods["qat"]["steps_run"] == 2  # epochs 0 and 1 were not run again
    losses = lambda q: [{k: v for k, v in e.items() if k != "wall_s"}  # noqa: E731
                        for e in record_of(q).methods["qat"]["epochs"]]
    assert losses(resumed) == losses(full)  # the history (epoch 0 from the checkpoint) is the same too
    a, b = _tensors(full), _tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a finished run resumes to the same tensors without a step
    again = qat_finetune(_student(resnet20), resnet20, images, cfg, seed=3, progress=False, ckpt_dir=tmp_path,
                         resume=True)
    assert record_of(again).methods["qat"]["steps_run"] == 0
    assert all(torch.equal(v, _tensors(again)[k]) for k, v in a.items())


@pytest.mark.parametrize("at", [(0, 0), (1, 0)], ids=["warm-up", "training"])
def test_ctrl_c_mid_epoch_checkpoints_and_resumes_exactly(resnet20, tmp_path, at, request):
    """A real SIGINT mid-epoch (during the EMA warm-up / during training): the step finishes, the
    checkpoint (EMA observers, optimizer state) is written, KeyboardInterrupt is raised; resuming gives
    the uninterrupted tensors."""
    images, cfg = _images(24, seed=2), _resume_cfg()
    full = qat_finetune(_student(resnet20), resnet20, images, cfg, seed=5, progress=False)
    # Ctrl-C as in a terminal, even when the test runner was started with SIGINT ignored (`cmd &` in a
    # non-interactive shell), where the engine rightly leaves SIGINT alone
    prev = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, prev))

    def ctrl_c(epoch, step, loss):
        if (epoch, step) == at:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        qat_finetune(_student(resnet20), resnet20, images, cfg, seed=5, progress=False, ckpt_dir=tmp_path,
                     callback=ctrl_c)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed = qat_finetune(_student(resnet20), resnet20, images, cfg, seed=5, progress=False, ckpt_dir=tmp_path,
                           resume=True)
    assert record_of(resumed).methods["qat"]["steps_run"] == 6 - (2 * at[0] + at[1] + 1)
    a, b = _tensors(full), _tensors(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_settings(resnet20, tmp_path):
    images = _images(16)
    with pytest.raises(QATInterrupted):
        qat_finetune(_student(resnet20), resnet20, images, _resume_cfg(), progress=False, ckpt_dir=tmp_path,
                     stop_at=(0, 1))
    other = QATConfig(**{**_resume_cfg().to_dict(), "lr": 2e-3})
    with pytest.raises(BadValueError, match="other settings"):
        qat_finetune(_student(resnet20), resnet20, images, other, progress=False, ckpt_dir=tmp_path, resume=True)


# -- bad hyperparameters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hp,needle", [
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"lr": "fast"}, "lr"),
    ({"lr": -1e-4}, "lr"),
    ({"momentum": 0.0}, "nesterov"),
    ({"temperature": 0}, "temperature"),
    ({"kd_weight": 0.0}, "loss weight"),
    ({"kd_reduction": "sum"}, "kd_reduction"),
    ({"precision": "fp16"}, "precision"),
    ({"crop_scale": [0.9, 0.5]}, "crop_scale"),
    ({"epochs": 1, "steps_per_epoch": 1}, "EMA warm-up"),
    ({"bns_variant": "nope"}, "bns_variant"),
    ({"nesterov": "maybe"}, "nesterov"),
])
def test_bad_hparams_raise_bad_value_error(resnet20, hp, needle):
    from zsq.recipes import QuantContext
    from zsq.spec import LayerPolicy

    ctx = QuantContext(model=resnet20, images=_images(8), protocol=PROTOCOLS["qat"], w_bits=4, a_bits=4,
                       policy=LayerPolicy(), hparams=hp, progress=False)
    with pytest.raises(BadValueError, match=needle) as e:
        quantize_qat(ctx)
    assert "\n" not in str(e.value)


def test_needs_images(resnet20):
    with pytest.raises(BadValueError, match="images"):
        qat_finetune(_student(resnet20), resnet20, None, QATConfig(), progress=False)


# -- the recipe -----------------------------------------------------------------------------------------

def test_qat_zeroq_registered():
    from zsq.recipes import HPARAM_KEYS, QUANTIZERS, RECIPES

    r = RECIPES["qat-zeroq"]
    assert (r.family, r.kind, r.protocol, r.synth, r.quant) == ("baseline", "QAT", "qat", "zeroq", "qat-kd")
    assert set(r.budgets) == {"smoke", "default", "paper"} and r.budgets["default"]["n_images"] == 5120
    assert "qat-kd" in QUANTIZERS
    assert {"epochs", "lr", "kd_weight", "ce_weight", "bns_weight", "ema_epochs"} <= HPARAM_KEYS["qat-kd"]
    for b in ("smoke", "default", "paper"):
        QATConfig.from_hparams(r.budgets[b].get("quant"))  # every budget is a valid config


def test_qat_zeroq_smoke_end_to_end(smoke_qmodel):
    """The loop's record and accuracy of the shared smoke run (tests/test_contract.py checks its levels, its
    zsq.json and its save / load round trip; tests/test_cli.py the command line's)."""
    import zsq

    q = smoke_qmodel("qat-zeroq")
    res = record_of(q).result
    assert res["recipe"]["quant"] == "qat-kd" and res["protocol"] == "qat" and res["synthetic"]["n_images"] > 0
    assert res["recipe"]["hparams"]["steps_per_epoch"] == 4
    assert record_of(q).methods["qat"]["steps_run"] == 4 and len(record_of(q).methods["qat"]["epochs"]) == 1
    top1 = zsq.evaluate(q, str(CIFAR_TEST), limit=500, progress=False)["top1"]
    assert top1 > 20.0, top1  # 4 steps of W4A4: far from FP, far above chance
