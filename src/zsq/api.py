"""Orchestration of the flow model -> data -> quantizer -> quantized model -> save / evaluate.
No maths here: every step is a registered part."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .errors import BadValueError, DataError, OutputExistsError, UnknownNameError, ZsqError
from .hardware import cpu_name, device_record, module_device, resolve_device, set_backend_flags
from .models import load_model
from .paths import torch_save_atomic, write_json_atomic, writing
from .record import model_info, record_of
from .recipes import HPARAM_KEYS, PRE_STEPS, QUANTIZERS, RECIPES, QuantContext
from . import catalogue as _catalogue  # noqa: F401  (registers every recipe, quantizer and synthesizer)
from .spec import PROTOCOLS, LayerPolicy, check_bits, check_budget

SCHEMA_VERSION = 1


@dataclass
class Resolved:
    """A recipe with the user's explicit flags applied (what goes into zsq.json)."""

    name: str
    pre: str | None
    synth: str | None
    quant: str
    protocol: str
    budget: str
    hparams: dict[str, Any]


def resolve(recipe: str, *, pre=None, synth=None, quant=None, protocol=None, budget="default",
            hparams: dict | None = None) -> Resolved:
    r = RECIPES[recipe]
    budget = check_budget(budget)
    quant_name = quant or r.quant
    QUANTIZERS[quant_name]
    res = Resolved(
        name=r.name,
        pre=None if pre in ("none", "") else (pre or r.pre),
        synth=None if synth == "none" else (synth or r.synth),
        quant=quant_name,
        protocol=protocol or r.protocol,
        budget=budget,
        hparams={**r.hparams, **r.budgets.get(budget, {}).get("quant", {}), **(hparams or {})},
    )
    PROTOCOLS[res.protocol]
    if hparams:
        allowed = set(r.hparams) | set(HPARAM_KEYS.get(res.quant, ())) | set(HPARAM_KEYS.get(f"pre:{res.pre}", ()))
        for k in hparams:
            if k not in allowed:
                raise UnknownNameError(f"hparam of quantizer {res.quant}", k, allowed)
        # every value against its declared type / choices (zsq.settings), before any work; CLI strings converted
        from .settings import check_hparams

        checked = check_hparams(hparams, [res.quant, f"pre:{res.pre}", r.quant, f"pre:{r.pre}"])
        res.hparams = {**res.hparams, **checked}
    if res.pre:
        PRE_STEPS[res.pre]
    if res.synth:
        from .synth import SYNTHESIZERS

        SYNTHESIZERS[res.synth]
    return res


def check_output_dir(out: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse a directory holding a finished result unless ``overwrite``; then retire its zsq.json
    first so that an interrupted run never leaves an old zsq.json beside new files."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"-o {out} is a file, not a directory")
    if (out / "zsq.json").exists():
        if not overwrite:
            raise OutputExistsError(f"{out} already holds a result (zsq.json); pass --overwrite or choose another -o")
        with writing(out / "zsq.json", every=True):  # read-only OUT: a one-line OutputError
            (out / "zsq.json").unlink()


def synth_settings(res: Resolved, synth_overrides: dict | None = None) -> tuple[dict, int | None]:
    """The synthesizer settings of a resolved recipe: (config overrides, image count or None). The
    recipe's budget entry applies when the recipe runs its own synthesizer; ``synth_overrides``
    (``--synth-set``) go on top and are checked against the synthesizer's config (one-line error)."""
    from .synth import get_synthesizer

    rb = RECIPES[res.name].budgets.get(res.budget, {}) if res.synth == RECIPES[res.name].synth else {}
    overrides = {k: v for k, v in rb.items() if k not in ("quant", "n_images")}
    n = rb.get("n_images")
    if synth_overrides:
        if not res.synth:
            raise BadValueError(f"--synth-set: recipe {res.name} runs no synthesizer here")
        extra = dict(synth_overrides)
        n = extra.pop("n_images", n)
        overrides.update(extra)
        get_synthesizer(res.synth, res.budget, {**overrides, **({"n_images": n} if n is not None else {})})
    return overrides, n


def synthetic_data(model: nn.Module, res: Resolved, seed: int, *, synthetic: str | None = None,
                   progress: bool = True, n_images: int | None = None, synth_overrides: dict | None = None):
    """Calibration images from ``--synthetic DIR`` or the resolved synthesizer (cached by key)."""
    from .synth import SyntheticSet, synthesize

    if synthetic:
        return SyntheticSet.load(synthetic)
    if not res.synth:
        return None
    overrides, n = synth_settings(res, synth_overrides)
    n = n_images or n
    from .distributed import is_distributed, synthesize_sharded

    if is_distributed():  # under torchrun: each rank makes every WORLD_SIZE-th batch (zsq synthesize's sharding)
        return synthesize_sharded(model, res.synth, budget=res.budget, seed=seed, n_images=n, progress=progress,
                                  overrides=overrides or None)
    return synthesize(model, res.synth, budget=res.budget, seed=seed, n_images=n, progress=progress,
                      overrides=overrides or None)


def quantize(
    model: str | nn.Module = "cifar10_resnet20",
    recipe: str = "zeroq",
    w_bits: int = 4,
    a_bits: int = 4,
    *,
    protocol: str | None = None,
    pre: str | None = None,
    synth: str | None = None,
    quant: str | None = None,
    budget: str = "default",
    seed: int = 0,
    synthetic: str | None = None,
    calib: str | None = None,
    calib_n: int = 256,
    policy: LayerPolicy | None = None,
    hparams: dict | None = None,
    strict: bool = False,
    progress: bool = True,
    ckpt_dir: str | os.PathLike | None = None,
    resume: bool = False,
    synth_overrides: dict | None = None,
    mixed: Any = None,
    device: str | torch.device | None = "auto",
) -> nn.Module:
    """Quantize ``model`` with ``recipe``; returns the fake-quantized model; its record
    (:func:`zsq.record.record_of`) holds the provenance (``result``), layout and method records.
    ``synth_overrides``: synthesizer config fields (``--synth-set``) on top of the recipe's budget.
    ``mixed``: a :class:`zsq.quant.mixed.MixedConfig` (or its fields as a dict, e.g. ``{"wbits_avg": 3}``):
    the weight bits of every layer the protocol does not pin are searched under that budget on the same
    calibration images (ZeroQ's sensitivity) and replace ``w_bits``; the search goes into the record (``mixed``).
    ``{"bops_g": G}`` searches the searched layers' input-activation bits too (``act_candidates``) under a
    bit-operations budget; ``a_bits`` stays the bits of the activations it does not choose.
    ``device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (:func:`zsq.hardware.resolve_device`); the model
    is moved there once (``nn.Module.to``: a module you pass is moved in place) and every step runs there.

    Under torchrun with more than one process (every rank calls this with the same arguments): the
    synthesis is sharded over the ranks and the ``qat-kd`` quantizer trains data-parallel (other
    quantizers are refused, :mod:`zsq.distributed`); every rank returns the same model, rank 0 alone
    writes checkpoints (and should alone :func:`save`)."""
    w_bits, a_bits = check_bits(w_bits, "--w"), check_bits(a_bits, "--a")
    dev = resolve_device(device)
    # names and settings first (one-line errors before a model is loaded or an image made)
    res = resolve(recipe, pre=pre, synth=synth, quant=quant, protocol=protocol, budget=budget, hparams=hparams)
    if mixed is not None:  # --wbits-avg / --size: the search's settings checked before any work
        mixed = mixed_config(mixed)
        w_bits = mixed.w_bits()
    if isinstance(model, str):
        model = load_model(model)
    elif model_info(model) is None:
        model = load_model(model)
    set_backend_flags(dev)
    model = model.to(dev)
    with _data_parallel(res, model):  # under torchrun: sharded synthesis, data-parallel QAT
        t0, c0 = time.perf_counter(), time.process_time()
        fp = model
        if res.pre:
            fp = PRE_STEPS[res.pre](_copy(model), res.hparams)
        data_info = {"dir": None, "sha256": None, "n_images": 0, "kind": "none"}
        images = labels = None
        if calib:
            from .data.eval import load_images

            if calib_n <= 0:
                raise DataError(f"--calib-n must be > 0, got {calib_n}")
            images, _ = load_images(calib, model_info(model).preprocess, calib_n, seed=seed, progress=progress)
            data_info = {"dir": str(calib), "sha256": None, "n_images": int(images.shape[0]), "kind": "real"}
            res.synth = None
        else:
            sset = synthetic_data(fp, res, seed, synthetic=synthetic, progress=progress,
                                  synth_overrides=synth_overrides)
            if sset is not None:
                images, labels = sset.images, sset.labels  # labels: None unless the synthesizer made them
                data_info = {"dir": str(sset.dir), "sha256": sset.sha256, "n_images": int(sset.n_images),
                             "kind": "synthetic"}
        mixed_rec = None
        if mixed is not None:  # the bit search, on the quantizer's images (Gaussian inputs when it has none)
            policy, mixed_rec = _mixed_search(fp, res, mixed, images, labels, policy, seed, progress, a_bits)
        ctx = QuantContext(model=fp, images=images, protocol=PROTOCOLS[res.protocol], w_bits=w_bits, a_bits=a_bits,
                           policy=policy or LayerPolicy(), hparams=res.hparams, budget=res.budget, seed=seed,
                           progress=progress, ckpt_dir=Path(ckpt_dir) if ckpt_dir else None, resume=resume,
                           strict=strict, labels=labels)
        torch.manual_seed(seed)
        qmodel = QUANTIZERS[res.quant](ctx)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        qmodel.eval()
        rec = record_of(qmodel)
        rec.model = model_info(model)
        recipe_info = {"name": res.name, "pre": res.pre, "synth": res.synth, "quant": res.quant, "hparams": res.hparams}
        if synth_overrides:
            recipe_info["synth_overrides"] = dict(synth_overrides)
        rec.result = {
            "recipe": recipe_info,
            "protocol": res.protocol,
            "bits": {"w": w_bits, "a": a_bits},
            "budget": res.budget,
            "seed": seed,
            "synthetic": data_info,
            "policy": {"keep_fp": list(ctx.policy.keep_fp),
                       "layer_bits": {k: f"W{w}" if a is None else f"W{w}A{a}"
                                      for k, (w, a) in ctx.policy.layer_bits.items()}},
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "size": model_size(model, qmodel),
            "device": device_record(dev),
        }
        if mixed_rec is not None:
            rec.result["mixed"] = mixed_rec
        return qmodel


def mixed_config(mixed: Any):
    """A :class:`zsq.quant.mixed.MixedConfig` from itself or a dict of its fields (one-line error otherwise)."""
    from .quant.mixed import MixedConfig

    if isinstance(mixed, MixedConfig):
        return mixed
    if not isinstance(mixed, dict):
        raise BadValueError(f"mixed must be a MixedConfig or a dict of its fields, got {type(mixed).__name__}")
    try:
        return MixedConfig(**mixed)
    except TypeError:
        bad = sorted(set(mixed) - set(MixedConfig.__dataclass_fields__))
        raise UnknownNameError("mixed-precision setting", bad[0] if bad else str(mixed),
                               list(MixedConfig.__dataclass_fields__)) from None


def _mixed_search(fp, res, cfg, images, labels, policy, seed, progress, a_bits=8):
    """The searched bits as weight-only ``layer_bits`` of the policy (``WxAy`` entries for the layers whose
    input bits a ``bops_g`` search chose), and the search's record."""
    from .quant.mixed import mixed_policy, search

    r = search(fp, PROTOCOLS[res.protocol], cfg, images=images, labels=labels, policy=policy, seed=seed,
               progress=progress, a_bits=a_bits)
    return mixed_policy(policy, r.entries()), r.record(cfg)


def _data_parallel(res: Resolved, model: nn.Module):
    """Under torchrun with more than one process: the process group for the run (synthesis sharded
    over the ranks, the quantizer data-parallel), refusing quantizers that cannot split their work;
    outside torchrun nothing."""
    import contextlib

    from .distributed import DATA_PARALLEL_QUANTIZERS, is_distributed, process_group, world

    if not is_distributed():
        return contextlib.nullcontext()
    if res.quant not in DATA_PARALLEL_QUANTIZERS:
        raise BadValueError(f"quantizer {res.quant} has no data-parallel mode ({world()[1]} processes under torchrun; "
                            f"only {', '.join(DATA_PARALLEL_QUANTIZERS)} has one): run it in one process, e.g. "
                            "`torchrun ... -m zsq synthesize ... -o DIR` then `zsq quantize ... --synthetic DIR`")
    return process_group(next((p.device for p in model.parameters()), torch.device("cpu")))


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def model_size(fp: nn.Module, q: nn.Module) -> dict[str, int]:
    """Bytes of the FP model (fp32 parameters) and of the quantized one (packed integer weights at
    their bit width, fp32 scales and zero points per channel, everything else fp32)."""
    from .quant.modules import QUANT_LAYERS

    fp_bytes = sum(p.numel() * 4 for p in fp.parameters())
    qb = 0
    counted = set()
    for m in q.modules():
        if isinstance(m, QUANT_LAYERS):
            qb += (m.weight.numel() * m.wq.bits + 7) // 8 + m.wq.scale.numel() * 8
            counted.add(id(m.weight))
    qb += sum(p.numel() * 4 for p in q.parameters() if id(p) not in counted
              and not _is_quantizer_param(q, p))
    return {"fp_bytes": int(fp_bytes), "q_bytes": int(qb)}


def _is_quantizer_param(model, p) -> bool:
    from .quant.modules import Quantizer

    return any(p is getattr(m, "scale", None) for m in model.modules() if isinstance(m, Quantizer))


def evaluate(model: nn.Module, data, limit: int | None = None, progress: bool = True,
             device: str | torch.device | None = None) -> dict[str, float]:
    """Top-1 / top-5 of ``model`` on ``data``. ``device``: move the model there first (in place;
    :func:`zsq.hardware.resolve_device`); ``None`` evaluates where the model is."""
    from .data.eval import evaluate as _evaluate

    if device is not None and isinstance(model, nn.Module):
        dev = resolve_device(device)
        set_backend_flags(dev)
        model = model.to(dev)
    r = _evaluate(model, data, limit=limit, progress=progress)
    return {"top1": round(r["top1"], 2), "top5": round(r["top5"], 2), "n": r["n"]}


# -- save / load --------------------------------------------------------------------------------

def git_version(where: str | os.PathLike) -> str | None:
    """The commit of the git checkout holding ``where`` (short hash), with ``-dirty`` appended when a
    tracked file differs from it (``git describe --dirty``'s convention: the run did not use exactly that
    commit; untracked files do not count); ``None`` outside a checkout or without git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=where)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode or not head.stdout.strip():
            return None
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = status.returncode != 0 or bool(status.stdout.strip())  # unknown state: not claimed clean
    return head.stdout.strip() + ("-dirty" if dirty else "")


def software_versions() -> dict[str, str | None]:
    """The versions a record names: zsq (and its git commit), torch, torchvision, onnx, onnxruntime, python."""
    import torchvision

    def ver(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            return None

    git = git_version(Path(__file__).resolve().parent)
    return {"zsq": __version__, "git": git, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "onnx": ver("onnx"), "onnxruntime": ver("onnxruntime"), "python": platform.python_version()}


def _processes() -> int:
    """torchrun's world size (1 outside torchrun): the run's processes, each with ``threads`` threads."""
    from .distributed import world

    return world()[1]


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def save(qmodel: nn.Module, out: str | os.PathLike, *, metrics: dict | None = None, eval_path: str | None = None,
         overwrite: bool = True) -> Path:
    """Write ``OUT/qmodel.pt`` then ``OUT/zsq.json`` (last, atomically: a directory without it is incomplete)."""
    from .quant.modules import QUANT_LAYERS, weight_codes

    out = Path(out)
    check_output_dir(out, overwrite)
    with writing(out, every=True):  # a write the file system refuses is a one-line OutputError
        out.mkdir(parents=True, exist_ok=True)
    rec = record_of(qmodel)
    info, result = rec.model, rec.result
    int_w = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, QUANT_LAYERS) and m.wq.bits <= 8:
            codes = weight_codes(m.wq, m.weight.detach())
            int_w[name] = codes.to(device="cpu", dtype=torch.int16 if m.wq.qmax > 127 else torch.int8)
    layout = rec.layout
    payload = {
        "format": "zsq-qmodel-1",
        "model": {"id": info.id, "preprocess": info.preprocess.to_dict(), "num_classes": info.num_classes},
        "layout": {"protocol": result.get("protocol", layout.protocol), "w_bits": layout.w_bits,
                   "a_bits": layout.a_bits, "policy": result.get("policy", {})},
        # quantizers keep their configuration as ``_extra_state`` (plain dicts), not tensors
        "state_dict": {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                       for k, v in qmodel.state_dict().items()},
        "int_weights": int_w,
    }
    torch_save_atomic(payload, out / "qmodel.pt")
    doc = {
        "schema_version": SCHEMA_VERSION,
        "model": {"id": info.id, "weights_sha256": info.weights_sha256},
        "recipe": result.get("recipe"),
        "protocol": result.get("protocol", layout.protocol),
        "bits": result.get("bits", {"w": layout.w_bits, "a": layout.a_bits}),
        "budget": result.get("budget"),
        "seed": result.get("seed"),
        "synthetic": result.get("synthetic"),
        "policy": result.get("policy"),
        **({"mixed": result["mixed"]} if result.get("mixed") else {}),  # a mixed-precision search only
        "layout": layout.to_dict(),
        "versions": software_versions(),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "processes": _processes(),
                    **(result.get("device") or device_record(module_device(qmodel)))},
        "wall_s": result.get("wall_s"),
        "cpu_s": result.get("cpu_s"),  # CPU seconds of all threads: robust to a shared machine
        "peak_rss_mb": peak_rss_mb(),
        "size": result.get("size"),
        "metrics": {"top1": metrics["top1"], "top5": metrics["top5"]} if metrics else None,
        "n_eval": metrics.get("n") if metrics else None,
        "eval_path": str(eval_path) if eval_path else None,
    }
    write_json_atomic(out / "zsq.json", doc)
    return out


def load(out: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a saved quantized model from ``OUT/`` (``weights_only=True``), on the CPU or on ``device``."""
    from .models.preprocess import Preprocess
    from .quant.protocol import apply_protocol

    out = Path(out)
    f = out / "qmodel.pt"
    if not (out / "zsq.json").is_file() or not f.is_file():
        raise DataError(f"{out} is not a finished zsq output (no zsq.json / qmodel.pt)")
    try:
        payload = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read {f}: {type(e).__name__}") from None
    meta = json.loads((out / "zsq.json").read_text())
    m = payload["model"]
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["preprocess"].items()})
    # the architecture only: every tensor comes from qmodel.pt next (a tv: / timm: / zoo model quantized from
    # --weights FILE needs neither that file nor its published weights again)
    fp = load_model(m["id"], preprocess=pre, num_classes=m["num_classes"], pretrained=False)
    lay = payload["layout"]
    pol = lay.get("policy") or {}
    policy = LayerPolicy(tuple(pol.get("keep_fp", ())), LayerPolicy.parse_layer_bits(
        [f"{k}={v}" for k, v in pol.get("layer_bits", {}).items()], weight_only=True))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = apply_protocol(fp, PROTOCOLS[lay["protocol"]], lay["w_bits"], lay["a_bits"], policy=policy)
    sd = payload["state_dict"]
    missing, unexpected = q.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise DataError(f"{f} does not match the rebuilt model ({len(missing)} missing, {len(unexpected)} unexpected)")
    q.eval()
    if device is not None:
        q = q.to(resolve_device(device))
    rec = record_of(q)
    rec.model = replace(model_info(fp), weights_sha256=(meta.get("model") or {}).get("weights_sha256"))
    rec.result = {k: meta.get(k) for k in ("recipe", "protocol", "bits", "budget", "seed", "synthetic", "policy",
                                          "wall_s", "size")}
    if meta.get("mixed"):
        rec.result["mixed"] = meta["mixed"]
    return q


def list_methods() -> list[dict[str, Any]]:
    return [r.to_row() for r in RECIPES._items.values()]
