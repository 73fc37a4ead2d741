"""The model zoo and ``load_model``: zoo names, ``tv:NAME``, ``timm:NAME``, ``path/file.py:factory``.

The entries live in :data:`~zsq.models.registry.ZOO` (the CIFAR ResNets are declared here; the other
model families register theirs from their own modules). Every loaded model carries a record
(:func:`zsq.record.record_of`) whose ``model`` is a :class:`ModelInfo`: its id, weights SHA-256 and
evaluation preprocessing. Weights are always read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BadValueError, UnknownNameError, WeightsError, ZsqError
from ..paths import sha256_file
from ..record import record_of
from .cifar_resnet import cifar_resnet, convert_akamaster_state_dict
from .fetch import find_weights
from .preprocess import CIFAR10, IMAGENET_TV, Preprocess
from .registry import CIFAR10_JPEG, ZOO, ModelEntry, ModelInfo, read_state_dict as _read_state_dict

_AKA = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet{d}-{p}.th"
_AKA_SHA = {
    20: ("12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", 81.03),
    32: ("d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850", 82.56),
    44: ("014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4", None),
    56: ("4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367", None),
}
for _d, (_sha, _top1) in _AKA_SHA.items():
    ZOO.add(
        f"cifar10_resnet{_d}",
        ModelEntry(
            name=f"cifar10_resnet{_d}",
            build=(lambda d=_d: cifar_resnet(d)),
            top1=_top1,
            source="github.com/akamaster/pytorch_resnet_cifar10",
            licence="BSD-2-Clause",
            **CIFAR10_JPEG,
            relpath=f"cifar10-resnet/resnet{_d}.th",
            url=_AKA.format(d=_d, p=_sha[:8]),
            sha256=_sha,
            bundled="resnet20.th" if _d == 20 else None,
            convert=convert_akamaster_state_dict,
        ),
    )

DEFAULT_MODEL = "cifar10_resnet20"


def apply_state_dict(model: nn.Module, sd: dict, what: str) -> None:
    """Load ``sd`` strictly (BN ``num_batches_tracked`` counters may be absent) or explain the mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            detail.append(f"{len(bad_shape)} of wrong shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        raise WeightsError(f"{what} does not fit this architecture: {'; '.join(detail)}; is it for another model?")
    model.load_state_dict(sd, strict=False)


def _load_zoo(name: str, weights: str | None, pretrained: bool = True) -> tuple[nn.Module, ModelEntry, str | None]:
    entry = ZOO[name]
    model = entry.build()
    if not pretrained and not weights:
        return model, entry, None
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {weights} does not exist")
        sha = sha256_file(path)
        apply_state_dict(model, entry.convert(_read_state_dict(path)), f"weights file {weights}")
    elif entry.load_weights is not None:
        sd, sha = entry.load_weights()
        apply_state_dict(model, entry.convert(sd), f"{name} weights")
    else:
        path = find_weights(entry.relpath, entry.url, entry.sha256, entry.bundled)
        sha = entry.sha256 or sha256_file(path)
        apply_state_dict(model, entry.convert(_read_state_dict(path)), f"weights file {path}")
    return model, entry, sha


def _load_torchvision(name: str, weights: str | None, pretrained: bool = True) -> tuple[nn.Module, str | None]:
    import torchvision

    if name not in torchvision.models.list_models():
        raise UnknownNameError("torchvision model", name, torchvision.models.list_models())
    if not pretrained and not weights:
        return torchvision.models.get_model(name, weights=None), None
    if weights:
        if not Path(weights).is_file():
            raise WeightsError(f"weights file {weights} does not exist")
        model = torchvision.models.get_model(name, weights=None)
        apply_state_dict(model, _read_state_dict(Path(weights)), f"weights file {weights}")
        return model, sha256_file(weights)
    # weights already in the local torch hub cache (no download under offline rules)
    try:
        wenum = torchvision.models.get_model_weights(name).DEFAULT
    except Exception:  # noqa: BLE001 - a builder without published weights
        raise WeightsError(f"tv:{name} has no published torchvision weights: pass --weights FILE") from None
    hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(wenum.url).name
    if not hub.is_file():
        from ..paths import offline

        if offline():
            raise WeightsError(f"tv:{name} weights not in the torch cache ({hub}) and offline: pass --weights FILE")
    try:
        model = torchvision.models.get_model(name, weights=wenum)
    except (OSError, ValueError, RuntimeError) as e:  # URLError is an OSError; a broken / partial download
        reason = getattr(e, "reason", None) or type(e).__name__
        raise WeightsError(f"tv:{name} weights could not be downloaded from {wenum.url} ({reason}): "
                           f"pass --weights FILE, or put the file at {hub}") from None
    return model, sha256_file(hub) if hub.is_file() else None


def tv_preprocess(name: str) -> Preprocess:
    """The evaluation preprocessing torchvision publishes with ``name``'s default weights (resize, crop,
    mean, std, interpolation; e.g. 299 px for inception_v3), else the common ImageNet one."""
    import torchvision

    try:
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        interp = getattr(t.interpolation, "value", "bilinear")
        return Preprocess(mean=tuple(float(v) for v in t.mean), std=tuple(float(v) for v in t.std), resize=resize,
                          crop=crop, interpolation=interp if interp in ("bilinear", "bicubic", "nearest")
                          else "bilinear", input_size=crop)
    except Exception:  # noqa: BLE001 - no published weights / transforms for this builder
        return IMAGENET_TV


def model_input_size(model: nn.Module) -> int | None:
    """The square input size a model declares: an ``input_size`` attribute (``S``, ``(H, W)`` or
    ``(C, H, W)``) or timm's ``pretrained_cfg`` / ``default_cfg['input_size']``; ``None`` if it says nothing."""
    from .preprocess import parse_input_size

    val = getattr(model, "input_size", None)
    if val is None or isinstance(val, nn.Module) or callable(val):
        val = None
        for attr in ("pretrained_cfg", "default_cfg"):
            cfg = getattr(model, attr, None)
            if isinstance(cfg, dict) and cfg.get("input_size") is not None:
                val = cfg["input_size"]
                break
    if val is None:
        return None
    return parse_input_size(val if isinstance(val, (int, str)) else tuple(val), f"{type(model).__name__}.input_size")


def _load_timm(name: str, weights: str | None, pretrained: bool = True) -> tuple[nn.Module, str | None]:
    try:
        import timm
    except ImportError:
        raise ZsqError("timm models need the timm extra: pip install 'zsq[timm]'") from None
    if not timm.is_model(name):
        raise UnknownNameError("timm model", name, timm.list_models())
    if not pretrained and not weights:
        return _timm_vit(timm.create_model(name, pretrained=False)), None
    if weights:
        if not Path(weights).is_file():
            raise WeightsError(f"weights file {weights} does not exist")
        model = timm.create_model(name, pretrained=False)
        apply_state_dict(model, _read_state_dict(Path(weights)), f"weights file {weights}")
        return _timm_vit(model), sha256_file(weights)
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # noqa: BLE001 - hub errors vary
        raise WeightsError(f"timm:{name} weights unavailable ({type(e).__name__}); pass --weights FILE") from None
    return _timm_vit(model), None


def _timm_vit(model: nn.Module) -> nn.Module:
    """A timm ViT/DeiT rebuilt as :class:`zsq.models.vit.VisionTransformer` (same weights, attention
    matmuls as modules so they can be quantized); other timm models are returned unchanged."""
    if "VisionTransformer" not in type(model).__name__:
        return model
    from .vit import from_timm

    try:
        return from_timm(model)
    except ValueError as e:
        import warnings

        warnings.warn(f"{e}: kept as timm built it, so its attention matmuls stay FP", stacklevel=3)
        return model


def _load_file(spec: str, weights: str | None) -> tuple[nn.Module, str | None]:
    path_s, _, factory = spec.rpartition(":")
    path = Path(path_s)
    if not path.is_file():
        raise ZsqError(f"model file {path_s} does not exist (MODEL form is path/to/file.py:factory)")
    mod_name = f"zsq_user_{abs(hash(str(path.resolve())))}"
    spec_ = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec_)
    sys.modules[mod_name] = module
    try:
        spec_.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - user code
        raise ZsqError(f"importing {path_s} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ZsqError(f"{path_s} has no function '{factory}'")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ZsqError(f"{path_s}:{factory} returned {type(model).__name__}, not an nn.Module")
    if weights:
        if not Path(weights).is_file():
            raise WeightsError(f"weights file {weights} does not exist")
        apply_state_dict(model, _read_state_dict(Path(weights)), f"weights file {weights}")
        return model, sha256_file(weights)
    return model, None


def load_model(
    spec: str | nn.Module = DEFAULT_MODEL,
    weights: str | None = None,
    preprocess: Preprocess | None = None,
    num_classes: int | None = None,
    input_size: int | str | tuple | None = None,
    pretrained: bool = True,
) -> nn.Module:
    """Load a model in eval mode, its :class:`ModelInfo` in its record (``record_of(model).model``).

    ``spec`` is a zoo name, ``tv:NAME``, ``timm:NAME``, ``path/file.py:factory`` or an ``nn.Module``.
    ``input_size`` (``S`` or ``"C,H,W"``, ``--input-size``) is the square image size the network takes;
    without it the size comes from ``preprocess.input_size``, its crop, or the model (zoo entry,
    torchvision's published transforms, timm's ``pretrained_cfg``, an ``input_size`` attribute). A
    ``file.py:factory`` model whose size none of these give is an error that names ``--input-size``
    (an ``nn.Module`` passed in keeps the CIFAR-10 default of 32 px for compatibility).
    ``pretrained=False`` (without ``weights``): the architecture only, parameters as built, no weights
    looked up (for a caller that loads every tensor next, as :func:`zsq.load` does for ``OUT/``).
    """
    from .preprocess import parse_input_size

    size = parse_input_size(input_size)
    if isinstance(spec, nn.Module):
        model, mid, sha, nc = spec, f"module:{type(spec).__name__}", None, num_classes
        pre = preprocess or replace(CIFAR10, input_size=None)
    elif spec.startswith("tv:"):
        model, sha = _load_torchvision(spec[3:], weights, pretrained)
        mid, pre, nc = spec, preprocess or tv_preprocess(spec[3:]), num_classes or 1000
    elif spec.startswith("timm:"):
        model, sha = _load_timm(spec[5:], weights, pretrained)
        mid, nc = spec, num_classes or 1000
        if preprocess is None:
            cfg = getattr(model, "pretrained_cfg", {}) or {}
            tsize = int(cfg.get("input_size", (3, 224, 224))[-1])
            preprocess = Preprocess(
                mean=tuple(cfg.get("mean", IMAGENET_TV.mean)), std=tuple(cfg.get("std", IMAGENET_TV.std)),
                resize=int(round(tsize / cfg.get("crop_pct", 0.875))), crop=tsize,
                interpolation=cfg.get("interpolation", "bilinear") if cfg.get("interpolation") in
                ("bilinear", "bicubic", "nearest") else "bilinear", input_size=tsize,
            )
        pre = preprocess
    elif ".py:" in spec:
        model, sha = _load_file(spec, weights)
        mid, pre, nc = spec, preprocess or Preprocess(), num_classes
    else:
        model, entry, sha = _load_zoo(spec, weights, pretrained)
        mid, nc = spec, entry.num_classes
        pre = preprocess or entry.preprocess
    if size is None:
        size = pre.input_size or pre.crop or model_input_size(model)
    if size is None and isinstance(spec, nn.Module):
        size = CIFAR10.input_size  # the API's long-standing default for a module passed in
    if size is None:
        raise BadValueError(f"the input size of {mid} is not known (its factory's model has no input_size "
                            "attribute): pass --input-size C,H,W, e.g. --input-size 3,224,224 (or --crop N; "
                            "API: input_size=)")
    if pre.input_size != size:
        pre = replace(pre, input_size=int(size))
    if nc is None:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        nc = last[-1].out_features if last else 0
    model.eval()
    record_of(model).model = ModelInfo(id=mid, weights_sha256=sha, preprocess=pre, num_classes=nc)
    return model


def zoo_table() -> list[dict[str, Any]]:
    return [
        {"name": e.name, "dataset": e.dataset, "top1": e.top1, "eval_set": e.eval_set, "source": e.source,
         "licence": e.licence}
        for e in ZOO._items.values()
    ]
