"""GenQ (zsq.gen.genq): the clear errors without a pipeline or without diffusers, the filters, and, where
diffusers is installed (the ``genq`` extra), the whole path on a tiny randomly initialised Stable
Diffusion pipeline built here (no download: zsq never fetches one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zsq.errors import BadValueError, DataError, ZsqError
from zsq.gen import genq
from zsq.gen.genq import GenQConfig, class_names, energy, select, to_model_input
from zsq.models.preprocess import Preprocess
from zsq.record import record_of

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# -- without diffusers ----------------------------------------------------------------------------------

def test_genq_without_pipeline_is_a_clear_error(resnet20, tmp_path, monkeypatch):
    import zsq

    monkeypatch.delenv(genq.ENV_PIPELINE, raising=False)
    with pytest.raises(DataError, match="ZSQ_GENQ_PIPELINE=DIR"):
        zsq.quantize(resnet20, recipe="genq", budget="smoke", progress=False)
    monkeypatch.setenv(genq.ENV_PIPELINE, str(tmp_path))  # a folder, but no pipeline in it
    with pytest.raises(DataError, match="no model_index.json"):
        zsq.quantize(resnet20, recipe="genq", budget="smoke", progress=False)
    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # diffusers not installed
    with pytest.raises(ZsqError, match=r"pip install 'zsq\[genq\]'"):
        zsq.quantize(resnet20, recipe="genq", budget="smoke", progress=False)


def test_genq_cli_without_pipeline_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != genq.ENV_PIPELINE}
    env.update(OMP_NUM_THREADS="1", COLUMNS="80")
    r = subprocess.run([sys.executable, "-m", "zsq", "quantize", "cifar10_resnet20", "--recipe", "genq", "--budget",
                        "smoke", "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out and "ZSQ_GENQ_PIPELINE" in out
    assert len([ln for ln in out.splitlines() if "error" in ln]) == 1, out
    assert not (tmp_path / "out" / "zsq.json").exists()


def test_genq_recipe_and_config():
    from zsq.recipes import RECIPES

    r = RECIPES["genq"]
    assert (r.family, r.kind, r.protocol, r.synth, r.quant) == ("generator", "PTQ", "ptq", "genq", "qdrop")
    assert {b: r.budgets[b]["n_images"] for b in ("smoke", "default", "paper")} == {"smoke": 8, "default": 256,
                                                                                    "paper": 1024}
    for budget in ("smoke", "default", "paper"):
        GenQConfig.for_budget(budget)
    with pytest.raises(BadValueError, match="energy_keep"):
        GenQConfig(oversample=4, energy_keep=0.2)  # fewer survivors than images
    with pytest.raises(BadValueError, match="prompt"):
        GenQConfig(prompt="a photo")
    assert class_names("", 10)[0] == "airplane"
    assert class_names("cat, dog", 2) == ["cat", "dog"]
    with pytest.raises(BadValueError, match="ZSQ_GENQ_CLASSES"):
        class_names("", 1000)
    with pytest.raises(BadValueError, match="3 class names"):
        class_names("a,b,c", 10)


def test_genq_filters():
    """Per class: the energy stage keeps the lowest-energy fraction (label-consistent candidates
    first), the distribution stage fills the slots with the lowest BN distance among them."""
    logits = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(energy(logits), -torch.logsumexp(logits, 1))
    labels = torch.tensor([0, 1, 0])
    cand = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0])  # 2 slots of class 0 -> pool of 6; 1 slot of class 1 -> 2
    e = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.5, 6.0])
    bn = torch.tensor([9.0, 1.0, 0.0, 0.0, 0.0, 1.0, 5.0, 0.0])
    agree = torch.tensor([True, True, True, True, True, True, False, True])
    keep = select(labels, cand, e, bn, agree, energy_keep=0.5)
    # class 0: energy keeps ceil(0.5 * 6) = 3 of the agreeing ones {0, 1, 2} (6 disagrees: last); BN picks 2, 1
    assert keep.tolist() == [2, 5, 1]
    assert torch.equal(cand[keep], labels)
    keep_all = select(labels, cand, e, bn, torch.ones(8, dtype=torch.bool), energy_keep=1.0)
    assert keep_all.tolist() == [2, 4, 3]  # no energy cut: the BN distance alone (stable ties)


def test_genq_images_follow_the_model_preprocessing():
    img = torch.rand(2, 3, 64, 48)
    cifar = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=32)
    x = to_model_input(img, cifar, 32)
    assert x.shape == (2, 3, 32, 32)
    assert float(x.min()) >= -2 - 1e-6 and float(x.max()) <= 2 + 1e-6  # (x - 0.5) / 0.25 of [0, 1]
    imnet = Preprocess(resize=40, crop=32, input_size=32)
    y = to_model_input(img, imnet, 32)  # short side 48 -> 40 (53 x 40), centre crop 32
    assert y.shape == (2, 3, 32, 32)
    const = to_model_input(torch.full((1, 3, 16, 16), 0.5), cifar, 32)
    torch.testing.assert_close(const, torch.zeros(1, 3, 32, 32))


# -- a tiny Stable Diffusion pipeline (diffusers + transformers) -----------------------------------------

def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-level BPE alphabet (no merges): every byte as a symbol, and as a word end."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    words = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {w: i for i, w in enumerate(words)}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A randomly initialised Stable Diffusion pipeline (UNet 8/16 channels, 2-block VAE, 2-layer CLIP
    text encoder on a byte-level vocabulary), saved with save_pretrained: ~0.5 MB."""
    pytest.importorskip("diffusers", reason="diffusers is not installed (the optional genq extra)")
    pytest.importorskip("transformers", reason="transformers is not installed (the optional genq extra)")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_sd")
    vocab = _byte_vocab()
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    v = len(vocab)
    te = CLIPTextModel(CLIPTextConfig(bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1, hidden_size=16,
                                      intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=v,
                                      max_position_embeddings=77, projection_dim=16))
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(d / "pipe"))
    return d / "pipe"


def test_genq_tiny_pipeline_synthesis(resnet20, tiny_pipeline, tmp_path, monkeypatch):
    """Images and labels of the right shapes, class-balanced, deterministic; every kept image is a
    candidate of its slot's class; the native size is the UNet's times the VAE's factor."""
    from zsq.synth import synthesize

    assert genq.native_size(genq.load_pipeline(str(tiny_pipeline))) == 16
    seen = {}
    real_select = genq.select

    def spy(labels, cand, e, bn, agree, keep):
        out = real_select(labels, cand, e, bn, agree, keep)
        seen.setdefault("calls", []).append((labels, cand, out))
        return out

    monkeypatch.setattr(genq, "select", spy)
    synth = genq.GenQ(GenQConfig.for_budget("smoke", pipeline=str(tiny_pipeline), gen_size=32, n_images=6,
                                            batch_size=4, gen_batch=4))
    a = synthesize(resnet20, synth, budget="smoke", seed=1, out_dir=tmp_path / "a", progress=False)
    assert a.images.shape == (6, 3, 32, 32) and a.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.isfinite(a.images).all()
    for labels, cand, keep in seen["calls"]:
        assert len(cand) == 2 * len(labels) and torch.equal(cand[keep], labels)
    synth2 = genq.GenQ(synth.config)
    b = synthesize(resnet20, synth2, budget="smoke", seed=1, out_dir=tmp_path / "b", progress=False)
    assert a.sha256 == b.sha256


def test_genq_token_learning(resnet20, tiny_pipeline, tmp_path):
    """Textual inversion: one placeholder per class, only those embedding rows move; the synthesizer
    learns them from a folder of real images and prompts with them."""
    from PIL import Image

    pipe = genq.load_pipeline(str(tiny_pipeline))
    emb0 = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    imgs, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 0, 3, 3])
    tokens = genq.learn_class_tokens(pipe, imgs, labels, class_names("", 10), steps=3, lr=0.1, batch=2)
    assert sorted(tokens) == [0, 3] and len(set(tokens.values())) == 2
    emb = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert emb.shape[0] == emb0.shape[0] + 2
    torch.testing.assert_close(emb[:emb0.shape[0]], emb0, rtol=0, atol=0)  # the vocabulary is untouched
    ids = [pipe.tokenizer.convert_tokens_to_ids(t) for t in tokens.values()]
    init = emb0[pipe.tokenizer("airplane", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(emb[ids[0]], init)  # the token learnt from its initialisation

    root = tmp_path / "few"
    for c, name in enumerate(class_names("", 10)):
        (root / name).mkdir(parents=True)
        Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(root / name / "0.png")
    synth = genq.GenQ(GenQConfig.for_budget("smoke", pipeline=str(tiny_pipeline), gen_size=32, n_images=2,
                                            batch_size=2, token_data=str(root), token_shots=1, token_steps=2))
    out = synth.make_batch(resnet20, 0, torch.Generator().manual_seed(0), batch_size=2, image_shape=(3, 32, 32))
    assert out["images"].shape == (2, 3, 32, 32)
    assert sorted(synth._tokens) == list(range(10))
    assert synth.prompts(torch.tensor([1]), class_names("", 10)) == [f"a photo of a {synth._tokens[1]} automobile"]


def test_genq_smoke_end_to_end(resnet20, tiny_pipeline, monkeypatch):
    import zsq

    monkeypatch.setenv(genq.ENV_PIPELINE, str(tiny_pipeline))
    q = zsq.quantize(resnet20, recipe="genq", w_bits=4, a_bits=4, budget="smoke", progress=False,
                     hparams={"iters": 2})
    res = record_of(q).result
    assert res["recipe"]["synth"] == "genq" and res["recipe"]["quant"] == "qdrop" and res["protocol"] == "ptq"
    assert res["synthetic"]["n_images"] == 8
    with torch.inference_mode():
        assert torch.isfinite(q(torch.randn(2, 3, 32, 32))).all()
