"""Small dataclasses that describe *what* to do: bits, layer policy, protocol presets, budgets.

Nothing here computes anything; ``quant/protocol.py`` applies a :class:`Protocol` to a model.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, asdict
from typing import Any

from .errors import BadValueError
from .registry import Registry

VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if zsq supports it, else raise a one-line :class:`BadValueError`."""
    try:
        b = int(bits)
    except (TypeError, ValueError):
        raise BadValueError(f"{what} must be an integer in 2..8 or 16, got '{bits}'") from None
    if b not in VALID_BITS:
        raise BadValueError(f"{what} must be in 2..8 or 16, got {b}")
    return b


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: uniform affine, ``bits`` levels, symmetric or not, per channel or tensor."""

    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    ch_axis: int = 0

    def __post_init__(self):
        check_bits(self.bits)


@dataclass
class LayerPolicy:
    """Per-layer overrides on top of a protocol.

    ``keep_fp``: glob patterns of Conv/Linear names whose weights (and input quantizer) stay FP.
    ``layer_bits``: name pattern -> (w_bits, a_bits); ``a_bits`` applies to the quantizer of that
    layer's input tensor when the protocol quantizes it; ``None`` (a mixed-precision search's entries,
    written ``NAME=W3`` in zsq.json) leaves the activation bits to the protocol.
    """

    keep_fp: tuple[str, ...] = ()
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)

    @staticmethod
    def parse_layer_bits(items: list[str] | tuple[str, ...], weight_only: bool = False) -> dict[str, tuple[int, int]]:
        """Parse ``NAME=WxAy`` strings (e.g. ``layer1.0.conv1=W4A8``); with ``weight_only`` (zsq.json's
        policy) also ``NAME=W3``, read as ``(3, None)``."""
        out = {}
        for it in items:
            if weight_only and (m := re.fullmatch(r"([^=]+)=[Ww](\d+)", it.strip())):
                out[m.group(1)] = (check_bits(m.group(2), "--layer-bits W"), None)
                continue
            m = re.fullmatch(r"([^=]+)=[Ww](\d+)[xX]?[Aa](\d+)", it.strip())
            if not m:
                raise BadValueError(f"--layer-bits expects NAME=WxAy (e.g. layer1.0.conv1=W4A8), got '{it}'")
            out[m.group(1)] = (check_bits(m.group(2), "--layer-bits W"), check_bits(m.group(3), "--layer-bits A"))
        return out

    def is_fp(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.keep_fp)

    def bits_for(self, name: str) -> tuple[int, int] | None:
        for pat, wa in self.layer_bits.items():
            if fnmatch.fnmatchcase(name, pat):
                return wa
        return None

    def unmatched(self, names: list[str]) -> list[str]:
        """Patterns that match no layer (reported as an error: a typo would silently do nothing)."""
        pats = list(self.keep_fp) + list(self.layer_bits)
        return [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n in names)]


@dataclass(frozen=True)
class Protocol:
    """Which tensors are quantized where (see ``../shared/docs/benchmarks.md``).

    ``act_placement``: ``"output"`` puts an activation quantizer after every activation function
    and at every residual block output; ``"input"`` quantizes the input tensor of every quantized
    layer but the first (one shared quantizer per tensor, so residual shortcuts reading the same
    tensor are quantized too, as Genie's code does).
    ``first_w8`` / ``last_w8``: first conv / last linear weights at 8 bits (else W).
    ``first_a8``: the first quantized activation (stem output / second layer's input) at 8 bits.
    ``last_a8``: the classifier's input (last quantized activation) at 8 bits (else A).
    Matmuls between two activations (ViT attention, :class:`zsq.ops.MatMul`) have both
    operands quantized at A under every protocol.
    """

    name: str
    description: str
    fold_bn: bool
    act_placement: str
    first_w8: bool
    last_w8: bool
    first_a8: bool
    last_a8: bool
    w_per_channel: bool = True
    w_symmetric: bool = False
    act_range: str = "static"  # "static": calibrated once; "ema": EMA of min/max during training
    freeze_bn_stats: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROTOCOLS: Registry[Protocol] = Registry("protocol")
for _p in (
    Protocol(
        "ptq",
        "BRECQ/Genie lineage: BN folded; weights per channel asym; first conv + last linear W8; "
        "stem output and classifier input A8; other activations at A after every activation / block output",
        fold_bn=True, act_placement="output", first_w8=True, last_w8=True, first_a8=True, last_a8=True,
    ),
    Protocol(
        "qat",
        "GDFQ lineage: every Conv/Linear at W (first and last too); activations at A after every ReLU "
        "and block output incl. the classifier input; BN kept with frozen statistics; EMA ranges",
        fold_bn=False, act_placement="output", first_w8=False, last_w8=False, first_a8=False, last_a8=False,
        act_range="ema", freeze_bn_stats=True,
    ),
    Protocol(
        "fixed",
        "deployment-style, no learning: layer policy of ptq (BN folded, first/last W8, stem output and "
        "classifier input A8), ranges from min-max / BN statistics",
        fold_bn=True, act_placement="output", first_w8=True, last_w8=True, first_a8=True, last_a8=True,
    ),
    Protocol(
        "genie-native",
        "Genie's code: BN not folded; activation quantizers at quantized-layer inputs (shortcuts share "
        "them); first layer W8 with FP input; second layer's input A8; last layer W8 with A8 input",
        fold_bn=False, act_placement="input", first_w8=True, last_w8=True, first_a8=True, last_a8=True,
    ),
    # vit-ptq against PSAQ-ViT's code (zkkli/PSAQ-ViT models/vit_quant.py, layers_quant.py, quant_utils.py;
    # SMI's quantizer is the same code): the same weights (every Conv/Linear incl. patch embedding and
    # head at W, per-channel symmetric min-max; none kept at 8 bits) and the same per-tensor asymmetric
    # activation quantizers at every GEMM input (qkv/fc1 inputs = LayerNorm outputs, q/k/v, proj input,
    # fc2 input = GELU output, head input); LayerNorm, Softmax and GELU run in FP in both. Differences:
    # PSAQ-ViT leaves the softmax output (attn @ v's first operand) FP, vit-ptq quantizes it (an
    # integer attn @ v needs it; FQ-ViT and PTQ4ViT quantize it too, with log2 / twin-uniform grids);
    # PSAQ-ViT also quantizes the input image at A bits and tensors that feed no GEMM (embeddings,
    # pre-softmax scores, residual stream, proj/fc2 outputs, logits); vit-ptq keeps them FP, as zsq's
    # CNN protocols keep the network input and the logits FP.
    # PSAQ-ViT's symmetric step is amax / (2^(b-1) - 0.5), zsq's amax / (2^(b-1) - 1).
    Protocol(
        "vit-ptq",
        "vision transformers (PSAQ-ViT / SMI code lineage): every Conv/Linear, patch embedding and head "
        "included, at W per-channel symmetric; activations at A per tensor at every GEMM input: the inputs of "
        "all layers but the patch embedding and both operands of the attention matmuls (q, k; softmax "
        "probabilities, v); LayerNorm, Softmax, GELU, the residual stream and the logits FP",
        fold_bn=False, act_placement="input", first_w8=False, last_w8=False, first_a8=False, last_a8=False,
        w_symmetric=True,
    ),
    # deploy: what ONNX Runtime's integer kernels execute (QLinearConv takes one weight zero point per
    # filter, so weights are symmetric s8; activations u8 per tensor at every tensor an integer kernel
    # reads or writes): see zsq.quant.deploy and zsq.export.onnx
    Protocol(
        "deploy",
        "what ONNX Runtime's integer kernels run: BN folded; weights per channel symmetric (s8, zero point 0), "
        "first conv + last linear W8; activations per tensor at every Conv/Linear input (the network input at 8 "
        "bits) and output (after its ReLU/ReLU6), every residual block output, pooling and shortcut output, "
        "classifier input A8; logits FP",
        fold_bn=True, act_placement="deploy", first_w8=True, last_w8=True, first_a8=True, last_a8=True,
        w_symmetric=True,
    ),
):
    PROTOCOLS.add(_p.name, _p)


BUDGETS = ("smoke", "default", "paper")


def check_budget(name: str) -> str:
    if name not in BUDGETS:
        from .errors import UnknownNameError

        raise UnknownNameError("budget", name, BUDGETS)
    return name
