"""The CIFAR-10 ViT (zsq.models.vit), its zoo entry, the ``vit-ptq`` protocol and bench/train_vit.py.

The per-tensor table is observed on the operands the GEMMs actually receive: a TorchFunctionMode
records every ``conv2d`` / ``linear`` / ``matmul`` call of a forward pass, independently of where
the quantizers sit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_bench_script
from torch import nn
from torch.overrides import TorchFunctionMode

import zsq
from zsq.errors import BadValueError, ChecksumError, WeightsError
from zsq.models import vit as vitmod
from zsq.models.vit import VIT_TINY, MatMul, VisionTransformer
from zsq.ptq.calibrate import calibrate
from zsq.quant.modules import QuantMatMul, Quantizer
from zsq.quant.protocol import apply_protocol
from zsq.record import model_info, record_of
from zsq.spec import PROTOCOLS, LayerPolicy

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
TRAIN_TAR = ASSETS / "cifar10-jpeg" / "train.tar"
TEST_TAR = ASSETS / "cifar10-jpeg" / "test.tar"
W, A = 3, 3


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return zsq.load_model(VisionTransformer(VIT_TINY))


# ------------------------------------------------------------------------------------------- model
def test_shapes_and_parameter_count(vit, one_thread):
    n = sum(p.numel() for p in vit.parameters())
    assert n == 1_806_538  # 192-dim, 6 blocks, 3 heads, MLP 384: see zsq.models.vit
    x = torch.randn(2, 3, 32, 32)
    calls: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
             for name, m in vit.named_modules() if not list(m.children())]
    with torch.no_grad():
        out = vit(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        tok = vit.tokens(x)
    assert tok.shape == (2, 65, 192) and out.shape == (2, 10)
    assert set(calls.values()) == {1}  # every leaf module called once: hooks and quantizers see each op
    assert sum(isinstance(m, MatMul) for m in vit.modules()) == 12
    assert sum(isinstance(m, nn.Softmax) for m in vit.modules()) == 6


def test_kept_tokens(vit, one_thread):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = vit(x)
        every = vit(x, keep=torch.arange(64).expand(3, -1))
        shuffled = vit(x, keep=torch.stack([torch.randperm(64) for _ in range(3)]))
        sparse = vit(x, keep=torch.arange(0, 64, 4).expand(3, -1))
    assert torch.equal(every, dense)
    # attention is permutation-equivariant over patch tokens, the CLS output invariant
    torch.testing.assert_close(shuffled, dense, rtol=1e-4, atol=1e-5)
    assert sparse.shape == dense.shape and not torch.allclose(sparse, dense, atol=1e-3)
    seen = []
    h = vit.blocks[0].attn.softmax.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with torch.no_grad():
        vit(x, keep=torch.arange(10).expand(3, -1))
    h.remove()
    assert seen == [(3, 3, 11, 11)]  # kept patches + CLS are all that is fed forward
    with pytest.raises(ValueError, match="keep"):
        vit(x, keep=torch.arange(10))


# --------------------------------------------------------------------------------------- protocol
class _GemmOperands(TorchFunctionMode):
    """Records (op, first operand, second operand) of every conv2d / linear / matmul call."""

    OPS = {F.conv2d: "conv2d", F.linear: "linear", torch.matmul: "matmul"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            b = args[1] if len(args) > 1 else kwargs["weight"]
            self.calls.append((self.OPS[func], args[0].detach(), b.detach()))
        return func(*args, **kwargs)


def _bits(t: torch.Tensor, per_row: bool = False) -> object:
    levels = max(r.unique().numel() for r in t.reshape(t.shape[0], -1)) if per_row else t.unique().numel()
    return W if levels <= 2**W else 8 if levels <= 256 else "FP"


def _vit_table(depth: int) -> list[tuple[str, str, object, object]]:
    """vit-ptq: (op name, kind, first operand bits, second operand bits); W = weight, per channel."""
    rows = [("patch_embed.proj", "conv2d", "FP", W)]  # the image stays FP, as in every zsq protocol
    for i in range(depth):
        b = f"blocks.{i}"
        rows += [(f"{b}.attn.qkv", "linear", A, W), (f"{b}.attn.matmul1", "matmul", A, A),
                 (f"{b}.attn.matmul2", "matmul", A, A), (f"{b}.attn.proj", "linear", A, W),
                 (f"{b}.mlp.fc1", "linear", A, W), (f"{b}.mlp.fc2", "linear", A, W)]
    return rows + [("head", "linear", A, W)]


def test_protocol_table_vit(vit, real_batch, one_thread):
    x, _ = real_batch
    q = apply_protocol(vit, PROTOCOLS["vit-ptq"], W, A)
    calibrate(q, x)
    fp_in = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: fp_in.__setitem__(n, a[0]))
             for n, m in q.named_modules() if isinstance(m, (nn.LayerNorm, nn.Softmax))]
    rec = _GemmOperands()
    with torch.no_grad(), rec:
        logits = q(x)
    for h in hooks:
        h.remove()
    expected = _vit_table(VIT_TINY.depth)
    assert [k for k, *_ in rec.calls] == [k for _, k, *_ in expected]
    observed = [(name, kind, _bits(a), _bits(b, per_row=kind != "matmul"))
                for (name, kind, *_), (_, a, b) in zip(expected, rec.calls)]
    wrong = [(o, e) for o, e in zip(observed, expected) if o != e]
    assert not wrong, f"(observed, expected): {wrong}"
    # LayerNorm inputs (the residual stream), softmax inputs (scores) and logits stay FP
    assert len(fp_in) == 2 * VIT_TINY.depth + 1 + VIT_TINY.depth
    assert all(_bits(t) == "FP" for t in fp_in.values()), {n: t.unique().numel() for n, t in fp_in.items()}
    assert _bits(logits) == "FP"
    # weights per-channel symmetric (zero point 0, signed grid), activations per tensor asymmetric
    wqs = [m.wq for m in q.modules() if hasattr(m, "wq")]
    assert len(wqs) == 2 + 4 * VIT_TINY.depth
    assert all(w.symmetric and w.per_channel and w.qmin == -(2 ** (W - 1)) and not w.zero_point.any() for w in wqs)
    # per block: qkv, proj, fc1, fc2 inputs + 2 x 2 matmul operands; plus the head input
    assert len(record_of(q).layout.acts) == 8 * VIT_TINY.depth + 1
    assert all(not a.symmetric and not a.per_channel for n, a in q.named_modules()
               if isinstance(a, Quantizer) and not n.endswith("wq"))


def test_vit_policy_and_other_protocols(vit, real_batch, one_thread):
    x, _ = real_batch
    pol = LayerPolicy(keep_fp=("blocks.0.attn.matmul2",), layer_bits=LayerPolicy.parse_layer_bits(["head=W8A8"]))
    q = apply_protocol(vit, PROTOCOLS["vit-ptq"], 4, 4, policy=pol)
    assert type(q.blocks[0].attn.matmul2) is MatMul and isinstance(q.blocks[1].attn.matmul2, QuantMatMul)
    assert q.head.wq.bits == 8 and q.head.aq_in.bits == 8 and q.blocks[0].mlp.fc1.wq.bits == 4
    with pytest.raises(BadValueError):
        apply_protocol(vit, PROTOCOLS["vit-ptq"], 4, 4, policy=LayerPolicy(keep_fp=("blocks.*.nope",)))
    # the CNN protocols also run: block outputs (residual stream) and GELU outputs, plus the matmuls
    q = apply_protocol(vit, PROTOCOLS["ptq"], 4, 4)
    calibrate(q, x[:8])
    names = [a.name for a in record_of(q).layout.acts]
    assert "blocks.0.aq_out" in names and "blocks.0.mlp.act.aq_out" in names and "blocks.0.attn.matmul1.aq_a" in names
    assert record_of(q).layout.weights["patch_embed.proj"] == 8 and record_of(q).layout.weights["head"] == 8


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_w8a8_close_to_fp_and_observers(vit, real_batch, one_thread):
    x, _ = real_batch
    with torch.no_grad():
        ref = vit(x)
    errs = {}
    for wa in ((8, 8), (4, 4)):
        q = apply_protocol(vit, PROTOCOLS["vit-ptq"], *wa)
        calibrate(q, x)
        with torch.no_grad():
            errs[wa] = _rel_err(q(x), ref)
    assert errs[(8, 8)] < 0.03, errs
    assert errs[(4, 4)] > 5 * errs[(8, 8)], errs
    # every calibration observer runs on the ViT (and sequential calibration), all close at W8A8
    for obs, seq, n in (("percentile", False, 8), ("mse", False, 8), ("minmax", True, 4)):
        q = apply_protocol(vit, PROTOCOLS["vit-ptq"], 8, 8)
        calibrate(q, x[:n], observer=obs, sequential=seq)
        with torch.no_grad():
            assert _rel_err(q(x[:n]), ref[:n]) < 0.06, (obs, seq)
    # SMI-style: calibrate and run the quantized model on kept tokens only
    keep = torch.arange(0, 64, 2).expand(len(x), -1)
    q = apply_protocol(vit, PROTOCOLS["vit-ptq"], 8, 8)
    with torch.no_grad():
        for _, m in q.named_modules():
            if isinstance(m, Quantizer) and m.mode == "observe":
                m.start_observing()
        q(x, keep=keep)
        for n, m in q.named_modules():
            if isinstance(m, Quantizer) and not n.endswith("wq"):
                m.finish_observing()
        assert _rel_err(q(x, keep=keep), vit(x, keep=keep)) < 0.03


# --------------------------------------------------------------------------------------------- zoo
def test_zoo_entry_without_weights_says_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSQ_HOME", str(tmp_path))
    monkeypatch.setattr("zsq.models.fetch.bundled", lambda name: None)
    with pytest.raises(WeightsError, match="bench/train_vit.py") as e:
        zsq.load_model("cifar10_vit_tiny")
    assert "--resume" in str(e.value) and "VIT_TINY_SHA256" in str(e.value)
    assert "cifar10_vit_tiny" in [r["name"] for r in zsq.models.zoo_table()]


def test_bundled_weights_are_the_recorded_ones_and_classify(monkeypatch, one_thread):
    """The committed cifar10_vit_tiny loads with its SHA-256 verified, a tampered copy is refused,
    and it classifies real test images (top-1 on the 1,000-image smoke subset near the recorded
    FP top-1 of the full test set)."""
    from zsq.data.eval import open_dataset
    from zsq.paths import sha256_file

    bundled = REPO / "src" / "zsq" / "models" / "weights" / vitmod.VIT_TINY_FILE
    assert vitmod.VIT_TINY_SHA256 and sha256_file(bundled) == vitmod.VIT_TINY_SHA256
    m = zsq.load_model("cifar10_vit_tiny")
    assert model_info(m).weights_sha256 == vitmod.VIT_TINY_SHA256
    ds = open_dataset(TEST_TAR, model_info(m).preprocess, limit=1000)
    top1 = zsq.evaluate(m, ds, progress=False)["top1"]
    assert abs(top1 - vitmod.VIT_TINY_TOP1) < 5.0, top1
    monkeypatch.setattr(vitmod, "VIT_TINY_SHA256", "f" * 64)
    with pytest.raises(ChecksumError, match="SHA-256"):
        zsq.load_model("cifar10_vit_tiny")


def test_zoo_entry_checks_sha256(tmp_path, monkeypatch):
    from zsq.paths import sha256_file

    torch.manual_seed(3)
    src = VisionTransformer(VIT_TINY)
    f = tmp_path / vitmod.VIT_TINY_RELPATH
    f.parent.mkdir(parents=True)
    torch.save(src.state_dict(), f)
    monkeypatch.setenv("ZSQ_HOME", str(tmp_path))
    monkeypatch.setattr("zsq.models.fetch.bundled", lambda name: None)
    monkeypatch.setattr(vitmod, "VIT_TINY_SHA256", None)
    with pytest.raises(ChecksumError, match="no SHA-256"):  # a file but no recorded hash: refused
        zsq.load_model("cifar10_vit_tiny")
    monkeypatch.setattr(vitmod, "VIT_TINY_SHA256", "0" * 64)
    with pytest.raises(ChecksumError, match="SHA-256"):
        zsq.load_model("cifar10_vit_tiny")
    monkeypatch.setattr(vitmod, "VIT_TINY_SHA256", sha256_file(f))
    m = zsq.load_model("cifar10_vit_tiny")
    assert model_info(m).weights_sha256 == sha256_file(f) and model_info(m).num_classes == 10
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values()))
    # --weights FILE works without a recorded hash (the user's own training run)
    m2 = zsq.load_model("cifar10_vit_tiny", weights=str(f))
    assert torch.equal(m2.head.weight, src.head.weight)


def test_timm_vit_is_rebuilt_with_matmul_modules(one_thread):
    timm = pytest.importorskip("timm", reason="pip install 'zsq[timm]'")
    from zsq.models.zoo import _timm_vit

    torch.manual_seed(0)
    t = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                          num_classes=10).eval()
    m = _timm_vit(t)
    assert isinstance(m, VisionTransformer) and m.cfg.depth == 2 and m.cfg.mlp_ratio == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), t(x), rtol=1e-4, atol=1e-5)
    d = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1)
    with pytest.warns(UserWarning, match="matmuls stay FP"):
        assert _timm_vit(d) is d


# ---------------------------------------------------------------------------------- training script
def _train_script():
    return load_bench_script("train_vit")


@pytest.mark.skipif(not TRAIN_TAR.is_file(), reason=f"shared asset {TRAIN_TAR} not present")
def test_train_script_resumes_to_identical_weights(tmp_path, one_thread):
    tv = _train_script()
    common = ["--train", str(TRAIN_TAR), "--test", str(TEST_TAR), "--subset", "64", "--batch-size", "32",
              "--epochs", "2", "--warmup-epochs", "1", "--threads", "1", "--eval-limit", "10", "--quiet",
              "--mixup", "0.2", "--cutmix", "1.0"]

    def run(name, *extra):
        return tv.main(common + ["--run-dir", str(tmp_path / name), "--out", str(tmp_path / name / "w.pt"), *extra])

    full = run("full")
    assert full["test"]["n"] == 10 and [r["step"] for r in full["epochs"]] == [2, 4]
    part = run("part", "--stop-after", "3")  # epoch 1 checkpointed, stopped mid-epoch 2
    assert part["stopped_at"] == 3 and not (tmp_path / "part" / "w.pt").exists()
    with pytest.raises(SystemExit, match="--resume"):
        run("part")  # an existing checkpoint is never silently overwritten
    resumed = run("part", "--resume")
    assert resumed["steps_run"] == 1  # only the missing step was trained
    a = torch.load(tmp_path / "full" / "w.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "w.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["weights"]["sha256"] == full["weights"]["sha256"]
    log = json.loads((tmp_path / "part" / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2] and log["step"] == 4
    with pytest.raises(BadValueError, match="other settings"):  # a changed recipe cannot resume
        tv.main(common[:-4] + ["--run-dir", str(tmp_path / "part"), "--resume"])
    m = zsq.load_model("cifar10_vit_tiny", weights=str(tmp_path / "full" / "w.pt"))
    assert model_info(m).weights_sha256 == full["weights"]["sha256"]


def test_augment_is_crop_and_flip():
    tv = _train_script()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    y = tv.augment(x, torch.Generator().manual_seed(0))
    assert y.dtype == torch.uint8 and y.shape == x.shape
    for i in range(6):  # each output is a 32x32 window of the zero-padded image, maybe mirrored
        xp = F.pad(x[i], (4, 4, 4, 4))
        wins = [xp[:, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(2)) for w in wins)
