"""The model registry: :data:`ZOO` and its entry types, and the one way weights are read.

Model families register their entries here (:mod:`.zoo` the CIFAR ResNets, :mod:`.efficientnet_lite`,
:mod:`.vit`); this module imports none of them, and :mod:`.zoo`'s ``load_model`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import WeightsError
from ..registry import Registry
from .preprocess import CIFAR10, Preprocess


@dataclass
class ModelEntry:
    """One zoo model: how to build it, where its weights come from, how to evaluate it."""

    name: str
    build: Callable[[], nn.Module]
    dataset: str
    top1: float | None  # FP top-1 measured here on the dataset named in `eval_set`
    eval_set: str
    source: str
    licence: str
    preprocess: Preprocess
    num_classes: int
    relpath: str | None = None  # under ZSQ_HOME / ZSQ_CACHE
    url: str | None = None
    sha256: str | None = None
    bundled: str | None = None  # file name under zsq/models/weights
    convert: Callable[[dict], dict] = lambda sd: sd
    load_weights: Callable[[], tuple[dict, str]] | None = None  # custom (state_dict, sha256) loader


@dataclass
class ModelInfo:
    id: str
    weights_sha256: str | None
    preprocess: Preprocess
    num_classes: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self):
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d


ZOO: Registry[ModelEntry] = Registry("model")
# what every CIFAR-10 zoo entry shares: evaluated on the JPEG test set with the same preprocessing
CIFAR10_JPEG = {"dataset": "CIFAR-10", "eval_set": "JPEG-CIFAR-10 test (cifar10-jpeg/test.tar)",
                "preprocess": CIFAR10, "num_classes": 10}


def read_state_dict(path: Path) -> dict:
    if not Path(path).is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise WeightsError(f"cannot read weights {path}: {type(e).__name__} (corrupt or not a torch file)") from None
    if not isinstance(sd, dict):
        raise WeightsError(f"weights file {path} holds a {type(sd).__name__}, expected a state_dict")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return sd
