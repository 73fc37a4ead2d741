"""GenQ (Li, Kim, Lee, Kundu, Panda; ECCV 2024): calibration images from a pre-trained text-to-image
diffusion pipeline, filtered by the FP model, then ordinary PTQ (the ``genq`` recipe) or QAT.

Not zero-shot in the strict sense: the pipeline (e.g. Stable Diffusion) was trained on web data;
keep its numbers apart from the other recipes'. zsq never downloads one: the pipeline is a local
directory written by diffusers' ``save_pretrained`` (``model_index.json`` and the component
folders), given as ``ZSQ_GENQ_PIPELINE=DIR`` (or the synthesizer's ``pipeline`` setting), loaded
with ``diffusers.DiffusionPipeline.from_pretrained(DIR, local_files_only=True)``; diffusers (and
transformers, for the text encoder) come with the ``genq`` extra: ``pip install 'zsq[genq]'``.

Per batch (:meth:`GenQ.make_batch`) [paper, abstract / summary level; the filters' exact forms,
the counts and the prompt are zsq's, **unverified**]:

1. labels: class-balanced, image ``i`` of the set gets class ``i mod C``;
2. ``oversample`` candidates per image, prompted ``prompt.format(class name)`` ("a photo of a
   {}"), ``steps`` denoising steps, guidance ``guidance``, at ``gen_size`` px (0: the pipeline's
   native size), resized / centre-cropped like the model's own preprocessing and normalised;
3. per class, a two-stage filter of its pool of candidates with the FP model:

   * **energy**: keep the ``energy_keep`` fraction with the lowest energy score
     ``E(x) = -T logsumexp(f(x) / T)`` (low energy = in-distribution for the classifier; the
     energy-based OOD score, T = ``energy_t``), candidates the model does not classify as their
     prompt's class ranked last (``label_filter``);
   * **distribution**: of those, keep the images whose per-image BN statistics are closest to
     the model's running statistics (per-channel Gaussian KL summed over the BN layers).

Data-scarce mode (``token_data``: an ImageFolder directory or tar of a few real images per class,
class folders in the model's label order; ``token_shots`` per class): one placeholder token per
class is learnt by textual inversion (the text encoder's embedding row of the token, trained with
the pipeline's denoising loss on those images; :func:`learn_class_tokens`) and prompted as
``prompt.format("<token> class name")``; GenQ's "inversion of learnable token embeddings". Its
seed is ``token_seed`` (not the run seed), so every batch sees the same tokens.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from ..errors import BadValueError, DataError, ZsqError
from ..record import model_info
from ..synth.base import SYNTHESIZERS, StepCallback, SynthConfig, Synthesizer
from ..synth.losses import BNStatsLoss

ENV_PIPELINE = "ZSQ_GENQ_PIPELINE"
ENV_CLASSES = "ZSQ_GENQ_CLASSES"
PIP_HINT = "pip install 'zsq[genq]'"


def import_diffusers():
    """The ``diffusers`` module, or a one-line :class:`ZsqError` naming the extra."""
    try:
        import diffusers
    except ImportError:
        raise ZsqError(f"genq needs diffusers and transformers (the genq extra): {PIP_HINT}") from None
    return diffusers


def load_pipeline(path: str, device: torch.device | str = "cpu"):
    """A diffusers text-to-image pipeline from a local ``save_pretrained`` directory (never a download)."""
    if not path:
        raise DataError(f"genq needs a local text-to-image diffusers pipeline: set {ENV_PIPELINE}=DIR (a folder "
                        "written by save_pretrained, e.g. a Stable Diffusion snapshot); zsq downloads none")
    p = Path(path).expanduser()
    if not (p / "model_index.json").is_file():
        raise DataError(f"{ENV_PIPELINE}={path} is not a diffusers pipeline folder (no model_index.json in it)")
    diffusers = import_diffusers()
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; the user gets one line
        raise DataError(f"cannot load the diffusers pipeline in {path}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def native_size(pipe) -> int:
    """The pipeline's default image side: the UNet's sample size times the VAE's scale factor."""
    unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(getattr(unet, "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", 8)
    if isinstance(sample, (tuple, list)):
        sample = sample[0]
    return int(sample) * int(scale) if sample else 512


@dataclass
class GenQConfig(SynthConfig):
    """GenQ's synthesis: ``n_images`` 1,024 = its PTQ calibration set (the survey's "1K"); the rest is
    zsq's choice (**unverified**): Stable Diffusion's default sampler settings (50 steps, guidance
    7.5, native size), 4 candidates per kept image, half of each class pool kept by energy.
    ``pipeline`` / ``classes`` fall back to ``$ZSQ_GENQ_PIPELINE`` / ``$ZSQ_GENQ_CLASSES`` (a file with
    one class name per line, or comma-separated names; CIFAR-10's names for 10-class models)."""

    n_images: int = 1024
    batch_size: int = 32
    pipeline: str = ""
    classes: str = ""
    prompt: str = "a photo of a {}"
    steps: int = 50
    guidance: float = 7.5
    gen_size: int = 0
    gen_batch: int = 8
    oversample: int = 4
    energy_keep: float = 0.5
    energy_t: float = 1.0
    label_filter: bool = True
    token_data: str = ""
    token_shots: int = 4
    token_steps: int = 200
    token_lr: float = 5e-3
    token_batch: int = 4
    token_seed: int = 0
    precision: str = "fp32"
    channels_last: bool = False

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"n_images": 8, "batch_size": 8, "steps": 2, "gen_size": 64, "oversample": 2, "energy_keep": 0.5,
                  "token_steps": 2},
        "default": {"n_images": 256, "steps": 25, "gen_size": 256, "oversample": 2, "energy_keep": 0.75,
                    "token_steps": 100},
        "paper": {},
    }

    def __post_init__(self):
        super().__post_init__()
        self.pipeline = self.pipeline or os.environ.get(ENV_PIPELINE, "")
        self.classes = self.classes or os.environ.get(ENV_CLASSES, "")
        for name in ("steps", "gen_batch", "oversample", "token_shots", "token_batch"):
            if int(getattr(self, name)) < 1:
                raise BadValueError(f"genq {name} must be >= 1, got {getattr(self, name)}")
        if int(self.gen_size) < 0 or int(self.gen_size) % 8 or int(self.token_steps) < 0:
            raise BadValueError(f"genq gen_size must be 0 or a multiple of 8 and token_steps >= 0, got "
                                f"{self.gen_size}, {self.token_steps}")
        if not 1.0 / int(self.oversample) <= float(self.energy_keep) <= 1.0:
            raise BadValueError(f"genq energy_keep must lie in [1/oversample, 1] = [{1 / int(self.oversample):.3g}, 1] "
                                f"(enough images must survive), got {self.energy_keep}")
        if "{}" not in self.prompt:
            raise BadValueError(f"genq prompt needs a '{{}}' for the class name, got '{self.prompt}'")


def class_names(spec: str, num_classes: int) -> list[str]:
    """Class names from ``spec`` (a file, one per line, or comma-separated) or CIFAR-10's for 10 classes."""
    if spec:
        p = Path(spec).expanduser()
        names = p.read_text().splitlines() if p.is_file() else spec.split(",")
        names = [n.strip() for n in names if n.strip()]
    elif num_classes == 10:
        from ..data.eval import CIFAR10_CLASSES

        names = list(CIFAR10_CLASSES)
    else:
        raise BadValueError(f"genq prompts need the names of the model's {num_classes} classes: set {ENV_CLASSES} to a "
                            "file with one name per line (in label order)")
    if len(names) != num_classes:
        raise BadValueError(f"genq got {len(names)} class names for a model with {num_classes} classes")
    return names


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row energy score ``-T logsumexp(logits / T)`` (lower = more in-distribution)."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def select(labels: Tensor, cand_labels: Tensor, scores_energy: Tensor, scores_bn: Tensor, agree: Tensor,
           energy_keep: float) -> Tensor:
    """Indices into the candidates, one per entry of ``labels`` (same order): per class, the pool of
    its candidates is cut to the ``energy_keep`` fraction with the lowest energy (candidates with
    ``agree`` false last), then the ones with the lowest BN distance fill the class's slots."""
    out = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        slots = torch.nonzero(labels == c).flatten()
        pool = torch.nonzero(cand_labels == c).flatten()
        n_keep = max(len(slots), math.ceil(energy_keep * len(pool)))
        key = scores_energy[pool].double() + torch.where(agree[pool], 0.0, float("inf")).double()
        order = torch.argsort(key, stable=True)  # inf + inf ties keep the pool order
        survivors = pool[order[:n_keep]]
        best = survivors[torch.argsort(scores_bn[survivors], stable=True)[:len(slots)]]
        out[slots] = best
    return out


def to_model_input(images: Tensor, preprocess, size: int) -> Tensor:
    """[0, 1] images (B, 3, H, W) -> the model's input: resize (short side) and centre crop as its
    preprocessing does (or straight to ``size``), then normalise with its mean / std."""
    mode = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}[getattr(preprocess, "interpolation",
                                                                                        "bilinear")]
    kw = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
    x = images.float()
    resize, crop = getattr(preprocess, "resize", None), getattr(preprocess, "crop", None)
    if resize:
        h, w = x.shape[-2:]
        s = resize / min(h, w)
        x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode=mode, **kw)
    if crop or resize:
        c = crop or min(x.shape[-2:])
        top, left = (x.shape[-2] - c) // 2, (x.shape[-1] - c) // 2
        x = x[..., top:top + c, left:left + c]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode=mode, **kw)
    x = x.clamp(0, 1)
    mean = torch.tensor(getattr(preprocess, "mean", (0.0, 0.0, 0.0)), dtype=x.dtype, device=x.device)
    std = torch.tensor(getattr(preprocess, "std", (1.0, 1.0, 1.0)), dtype=x.dtype, device=x.device)
    return (x - mean[:, None, None]) / std[:, None, None]


def learn_class_tokens(pipe, images: Tensor, labels: Tensor, names: list[str], *, steps: int, lr: float,
                       batch: int = 4, seed: int = 0, prompt: str = "a photo of a {}") -> dict[int, str]:
    """Textual inversion (Gal et al., 2023) of one placeholder token per class present in ``labels``
    from ``images`` ([0, 1], (N, 3, S, S) at the pipeline's size): the token's embedding row (started
    at the mean embedding of its class name's tokens) is the only trained parameter, on the
    pipeline's denoising loss (epsilon or v target as its scheduler predicts), Adam ``lr``. The
    pipeline's tokenizer and text encoder keep the tokens. Returns ``{class: token}``."""
    for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise BadValueError(f"genq token learning needs a Stable-Diffusion-like pipeline (tokenizer, text encoder, "
                                f"UNet, VAE); this one has no {part}")
    from diffusers import DDPMScheduler

    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    classes = sorted(int(c) for c in labels.unique())
    tokens = {c: f"<zsq-genq-{c}>" for c in classes}
    new = [t for t in tokens.values() if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new)
        te.resize_token_embeddings(len(tok))
    ids = {c: tok.convert_tokens_to_ids(t) for c, t in tokens.items()}
    emb = te.get_input_embeddings()
    dev = emb.weight.device
    with torch.no_grad():
        for c, i in ids.items():
            init = tok(names[c], add_special_tokens=False).input_ids or [tok.unk_token_id]
            emb.weight[i] = emb.weight[torch.tensor(init, device=dev)].mean(0)
    if steps == 0:
        return tokens
    mods = (te, unet, vae)
    saved = [[(p, p.requires_grad) for p in m.parameters()] for m in mods]
    for m in mods:
        m.requires_grad_(False)
    emb.weight.requires_grad_(True)
    row_mask = torch.zeros(emb.weight.shape[0], 1, dtype=torch.bool, device=dev)
    row_mask[list(ids.values())] = True
    frozen = emb.weight.detach().clone()
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    try:
        with torch.no_grad():
            x = images.to(dev, vae.dtype) * 2 - 1
            latents = vae.encode(x).latent_dist.mean * float(getattr(vae.config, "scaling_factor", 1.0))
        texts = [prompt.format(f"{tokens[int(c)]} {names[int(c)]}") for c in labels]
        opt = torch.optim.Adam([emb.weight], lr=lr)
        n_train = int(noise_sched.config.num_train_timesteps)
        for _ in range(int(steps)):
            idx = torch.randint(0, len(texts), (min(batch, len(texts)),), generator=g)
            lat = latents[idx.to(dev)]
            noise = torch.randn(lat.shape, generator=g).to(dev, lat.dtype)
            t = torch.randint(0, n_train, (len(idx),), generator=g).to(dev)
            noisy = noise_sched.add_noise(lat, noise, t)
            ids_in = tok([texts[i] for i in idx.tolist()], padding="max_length", max_length=tok.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(dev)
            cond = te(ids_in)[0]
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
            target = noise if noise_sched.config.prediction_type == "epsilon" else \
                noise_sched.get_velocity(lat, noise, t)
            loss = F.mse_loss(pred.float(), target.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            emb.weight.grad.mul_(row_mask)
            opt.step()
            with torch.no_grad():  # only the placeholder rows move
                emb.weight.copy_(torch.where(row_mask, emb.weight, frozen))
    finally:
        emb.weight.grad = None
        for group in saved:
            for p, rg in group:
                p.requires_grad_(rg)
    return tokens


@SYNTHESIZERS.register("genq")
class GenQ(Synthesizer):
    """GenQ's data: text-to-image diffusion images, two-stage filtered by the FP model (module docstring)."""

    name = "genq"
    Config = GenQConfig

    def __init__(self, config: GenQConfig | None = None):
        super().__init__(config)
        self._pipe = None
        self._tokens: dict[int, str] = {}

    def prepare(self, model: nn.Module) -> None:
        class_names(self.config.classes, _num_classes(model))
        self.pipeline(model)

    def pipeline(self, model: nn.Module):
        """The loaded pipeline (once per synthesizer), with the class tokens learnt in data-scarce mode."""
        if self._pipe is None:
            cfg = self.config
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            pipe = load_pipeline(cfg.pipeline, dev)
            if cfg.token_data:
                from ..data.eval import load_images
                from ..models.preprocess import Preprocess

                size = int(cfg.gen_size) or native_size(pipe)
                n_cls = _num_classes(model)
                pre = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=size, crop=size, input_size=size)
                imgs, labels = load_images(cfg.token_data, pre, int(cfg.token_shots) * n_cls, seed=int(cfg.token_seed))
                if int(labels.max()) >= n_cls:
                    raise DataError(f"{cfg.token_data} has more class folders than the model's {n_cls} classes")
                self._tokens = learn_class_tokens(pipe, imgs, labels, class_names(cfg.classes, n_cls),
                                                  steps=int(cfg.token_steps), lr=float(cfg.token_lr),
                                                  batch=int(cfg.token_batch), seed=int(cfg.token_seed),
                                                  prompt=cfg.prompt)
            self._pipe = pipe
        return self._pipe

    def prompts(self, labels: Tensor, names: list[str]) -> list[str]:
        out = []
        for c in labels.tolist():
            tok = self._tokens.get(int(c))
            out.append(self.config.prompt.format(f"{tok} {names[c]}" if tok else names[c]))
        return out

    def make_batch(self, model: nn.Module, batch_index: int, generator: torch.Generator, *, batch_size: int,
                   image_shape: tuple[int, int, int], step: StepCallback | None = None) -> dict[str, Tensor]:
        cfg = self.config
        pipe = self.pipeline(model)
        n_cls = _num_classes(model)
        names = class_names(cfg.classes, n_cls)
        first = batch_index * int(cfg.batch_size)
        labels = (first + torch.arange(batch_size)) % n_cls
        cand = labels.repeat_interleave(int(cfg.oversample))
        prompts = self.prompts(cand, names)
        size = int(cfg.gen_size) or native_size(pipe)
        base = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        chunks = range(0, len(prompts), int(cfg.gen_batch))
        pre = getattr(model_info(model), "preprocess", None)
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        xs, logits, dists = [], [], []
        bns = BNStatsLoss(model, stats="image", dispersion="var", reduction="kl", unbiased=False)
        for j, i in enumerate(chunks):
            g = torch.Generator(device="cpu").manual_seed((base + j) % (2 ** 63))
            with torch.no_grad():
                out = pipe(prompt=prompts[i:i + int(cfg.gen_batch)], height=size, width=size,
                           num_inference_steps=int(cfg.steps), guidance_scale=float(cfg.guidance), generator=g,
                           output_type="pt")
            imgs = out.images if hasattr(out, "images") else out[0]
            if not isinstance(imgs, Tensor):
                imgs = torch.as_tensor(imgs).permute(0, 3, 1, 2)
            x = to_model_input(imgs.to(dev), pre, image_shape[-1]).contiguous(memory_format=self.memory_format())
            with torch.no_grad(), bns, self.autocast(dev):
                logits.append(model(x).float())
                dists.append(bns.image_layer_losses().sum(0).float() if bns.modules else x.new_zeros(len(x)))
            xs.append(x.float())
            if step is not None:
                step(j, len(chunks), float(energy(logits[-1], cfg.energy_t).mean()))
        x, logit, dist = torch.cat(xs), torch.cat(logits), torch.cat(dists)
        e = energy(logit, float(cfg.energy_t))
        agree = logit.argmax(1).cpu() == cand if cfg.label_filter else torch.ones(len(cand), dtype=torch.bool)
        keep = select(labels, cand, e.cpu(), dist.cpu(), agree, float(cfg.energy_keep))
        return {"images": x[keep.to(x.device)], "labels": labels.to(torch.int64)}


def _num_classes(model: nn.Module) -> int:
    n = getattr(model_info(model), "num_classes", None)
    if not n:
        raise BadValueError("genq needs the model's class count (load it with zsq.load_model)")
    return int(n)


__all__ = ["ENV_CLASSES", "ENV_PIPELINE", "GenQ", "GenQConfig", "class_names", "energy", "learn_class_tokens",
           "load_pipeline", "native_size", "select", "to_model_input"]
