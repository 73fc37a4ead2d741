"""A DeiT-style Vision Transformer written for quantizers (and the ``cifar10_vit_tiny`` zoo entry).

Why not timm's ``VisionTransformer``: its attention computes ``q @ k^T`` and ``attn @ v`` with
``F.scaled_dot_product_attention`` or bare ``@``, which no module hook can see, so quantizers could
not reach the two attention matmuls. Here every operation a quantizer or a synthesizer needs is a
module of its own:

* ``attn.matmul1`` (:class:`~zsq.ops.MatMul`): ``q @ k^T``; ``attn.softmax``: the attention probabilities;
  ``attn.matmul2``: ``attn @ v`` (PSAQ-ViT's patch-similarity prior reads this output; SMI's patch
  scores read the softmax's CLS row). :mod:`zsq.quant.protocol` swaps each :class:`MatMul` for a
  :class:`~zsq.quant.modules.QuantMatMul` that fake-quantizes both operands.
* parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.norm1``,
  ``attn.qkv``, ``attn.proj``, ``mlp.fc1``/``fc2``, ``norm``, ``head``), so a timm ViT/DeiT
  state_dict loads unchanged (:func:`from_timm`).
* ``forward(x, keep=None)``: ``keep`` (int64 ``[B, K]``) selects the patch tokens (0..N-1, after
  the position embedding is added) that are fed forward; the CLS token is always kept. This is
  SMI's sparse model inversion (Egg-Hu/SMI ``vit_quant.py`` gathers after the position embedding;
  its absolute index ``i`` including CLS at 0 is patch index ``i - 1`` here). With every patch
  kept the output is the dense one.

``cifar10_vit_tiny`` (see :data:`VIT_TINY`): 32x32 input, patch 4 (64 patch tokens + CLS), embed
dim 192, 6 blocks, 3 heads (head dim 64, DeiT-Tiny's), MLP ratio 2 (hidden 384): 1.81 M parameters.
DeiT-Tiny's width and heads keep the per-head geometry that ViT quantization papers study; depth 6
and MLP ratio 2 (instead of 12 and 4) cut the training cost about 3x so that the model trains to a
useful accuracy in about 3 hours on 2 CPU cores (``bench/train_vit.py`` has the measurement).
Weights are trained here from ``cifar10-jpeg/train.tar``; nothing is pretrained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ChecksumError, WeightsError
from ..ops import MatMul  # noqa: F401  (lives in zsq.ops; re-exported: zsq.models.vit.MatMul)
from ..paths import zsq_home


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    drop_path: float = 0.0  # stochastic-depth rate of the last block (linear in depth, as DeiT)
    norm_eps: float = 1e-6  # DeiT / timm ViT

    def to_dict(self) -> dict:
        return asdict(self)


VIT_TINY = ViTConfig()


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches -> ``embed_dim`` tokens by one strided Conv2d."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, C]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.matmul1 = MatMul()  # q @ k^T
        self.softmax = nn.Softmax(dim=-1)
        self.matmul2 = MatMul()  # attn @ v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        attn = self.softmax(self.matmul1(q, k.transpose(-2, -1)) * self.scale)
        x = self.matmul2(attn, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """DeiT-style ViT (CLS token, learned position embedding, pre-norm blocks, CLS-token head)."""

    def __init__(self, cfg: ViTConfig = VIT_TINY):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, rates[i], cfg.norm_eps) for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """timm/DeiT initialisation: truncated normal (std 0.02) for Linear weights and embeddings."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens (+ position embedding), the ``keep`` subset if given, CLS token first."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        if keep is not None:
            if keep.dim() != 2 or keep.shape[0] != x.shape[0]:
                raise ValueError(f"keep must be an int64 [batch, kept] index, got shape {tuple(keep.shape)}")
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1)

    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tokens(x, keep)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.forward_features(x, keep)[:, 0])


def vit_tiny_cifar10() -> VisionTransformer:
    return VisionTransformer(VIT_TINY)


# ---------------------------------------------------------------------------------------- timm models
def from_timm(model: nn.Module) -> VisionTransformer:
    """The same network as a timm ``VisionTransformer`` (ViT / DeiT, CLS token, no distillation token,
    no LayerScale / register tokens / qk-norm), rebuilt with this module's attention so quantizers see
    the matmuls. Raises ``ValueError`` when the timm model uses a feature this class does not have."""
    why = _timm_incompatible(model)
    if why:
        raise ValueError(why)
    pe = model.patch_embed
    blk = model.blocks[0]
    cfg = ViTConfig(
        img_size=int(pe.img_size[0]), patch_size=int(pe.patch_size[0]), in_chans=int(pe.proj.in_channels),
        num_classes=int(model.head.out_features), embed_dim=int(model.embed_dim), depth=len(model.blocks),
        num_heads=int(blk.attn.num_heads), mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=blk.attn.qkv.bias is not None, norm_eps=float(blk.norm1.eps),
    )
    ours = VisionTransformer(cfg)
    sd = {k: v for k, v in model.state_dict().items() if k in ours.state_dict()}
    ours.load_state_dict(sd, strict=True)
    if getattr(model, "pretrained_cfg", None):
        ours.pretrained_cfg = model.pretrained_cfg
    return ours


def _timm_incompatible(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name != "VisionTransformer" or not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        return f"timm model not convertible ({name} is not timm's plain VisionTransformer)"
    pe = model.patch_embed
    checks = [
        (getattr(model, "cls_token", None) is not None, "it has no CLS token"),
        (getattr(model, "num_prefix_tokens", 1) == 1, "it has distillation or register tokens"),
        (not getattr(model, "no_embed_class", False), "its position embedding excludes the CLS token"),
        (getattr(model, "global_pool", "token") == "token", "it pools tokens instead of reading the CLS token"),
        (isinstance(getattr(model, "head", None), nn.Linear), "its head is not one Linear layer"),
        (getattr(pe, "img_size", None) is not None and pe.img_size[0] == pe.img_size[1]
         and pe.patch_size[0] == pe.patch_size[1] and not getattr(model, "dynamic_img_size", False),
         "its image or patch size is dynamic or not square"),
        (isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity), "it normalises patch embeddings"),
        (isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity), "it has a pre-norm"),
        (isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity), "it has an fc_norm"),
    ]
    for b in model.blocks:
        checks += [
            (isinstance(getattr(b, "ls1", nn.Identity()), nn.Identity), "it uses LayerScale"),
            (isinstance(getattr(b.attn, "q_norm", nn.Identity()), nn.Identity), "it uses qk-norm"),
            (isinstance(getattr(b.attn, "norm", nn.Identity()), nn.Identity), "it normalises attention output"),
            (isinstance(getattr(b.mlp, "act", None), nn.GELU)
             and isinstance(getattr(b.mlp, "norm", nn.Identity()), nn.Identity), "its MLP is not fc1-GELU-fc2"),
            (isinstance(b.norm1, nn.LayerNorm), "it does not use LayerNorm"),
        ]
    for ok, why in checks:
        if not ok:
            return f"timm model not convertible ({why})"
    return None


# ------------------------------------------------------------------------------------------- weights
VIT_TINY_FILE = "cifar10_vit_tiny.pt"  # zsq/models/weights/<this> (bundled) or ZSQ_HOME/<VIT_TINY_RELPATH>
VIT_TINY_RELPATH = f"cifar10-vit/{VIT_TINY_FILE}"
# SHA-256 of the trained weights; bench/train_vit.py prints it. None until the weights are committed.
VIT_TINY_SHA256: str | None = "59a11f4cd33d3dec61b8b17118c4e55a20d8faf9f3d6b6b5dd58fda8c0de8c97"
VIT_TINY_TOP1: float | None = 79.02  # FP top-1 on cifar10-jpeg/test.tar, measured by bench/train_vit.py
TRAIN_HINT = ("train them with `python bench/train_vit.py` (about 3 h on 2 CPU cores; resumable with --resume), "
              f"which writes src/zsq/models/weights/{VIT_TINY_FILE} and prints the SHA-256 to set as "
              "VIT_TINY_SHA256 in src/zsq/models/vit.py; or pass --weights FILE")


def load_vit_tiny_weights() -> tuple[dict, str]:
    """(state_dict, SHA-256) of ``cifar10_vit_tiny``: ``ZSQ_HOME`` copy first, then the bundled file."""
    from .fetch import bundled, find_weights
    from .registry import read_state_dict as _read_state_dict

    home = zsq_home()
    present = (home is not None and (home / VIT_TINY_RELPATH).is_file()) or bundled(VIT_TINY_FILE) is not None
    if not present:
        raise WeightsError(f"cifar10_vit_tiny has no weights yet ({VIT_TINY_FILE} not found): {TRAIN_HINT}")
    if VIT_TINY_SHA256 is None:
        raise ChecksumError(f"cifar10_vit_tiny weights exist but no SHA-256 is recorded for them: {TRAIN_HINT}")
    path = find_weights(VIT_TINY_RELPATH, None, VIT_TINY_SHA256, VIT_TINY_FILE)
    return _read_state_dict(Path(path)), VIT_TINY_SHA256


def _register() -> None:
    from .registry import CIFAR10_JPEG, ZOO, ModelEntry

    source = "trained here from cifar10-jpeg/train.tar by bench/train_vit.py (DeiT-style, 1.81 M params)"
    ZOO.add("cifar10_vit_tiny", ModelEntry(
        name="cifar10_vit_tiny", build=vit_tiny_cifar10, top1=VIT_TINY_TOP1, source=source, licence="Apache-2.0",
        relpath=VIT_TINY_RELPATH, sha256=VIT_TINY_SHA256, bundled=VIT_TINY_FILE, load_weights=load_vit_tiny_weights,
        **CIFAR10_JPEG,
    ))


_register()
