"""The generators of the GDFQ lineage (methods.md C.4): one DCGAN-style body with three ways to feed
it the class, and Qimera's superposed-embedding input.

Body [code: xushoukai/GDFQ main.py ``Generator``, ``Generator_imagenet``]::

    input (B, d) -> Linear -> (B, 128, s/4, s/4) -> BN(128) -> up x2 -> conv3x3 128 -> BN(128, eps 0.8)
    -> LeakyReLU 0.2 -> up x2 -> conv3x3 64 -> BN(64, eps 0.8) -> LeakyReLU 0.2 -> conv3x3 3 -> tanh
    -> BN(3, affine=False)

(the ``0.8`` is BN's ``eps`` given positionally in the official code, a DCGAN-template quirk kept for
faithfulness; ``body_eps``). The class enters through ``cond``:

* ``"embed"`` (GDFQ, CIFAR): the input is ``Embedding(y) * z`` (elementwise, ``latent_dim`` wide);
* ``"cbn"`` (GDFQ, ImageNet 224x224): the input is ``z``; the three affine BNs become categorical
  conditional BNs (per-class gamma initialised to 1, beta to 0) [code: xushoukai/GDFQ
  conditional_batchnorm.py];
* ``"none"``: unconditional (ZAQ, DFQ-AKD: ``z`` only) [code: FLHonker/ZAQ-code network/gan.py].

``superpose=True`` replaces the label input by Qimera's [code: iamkanghyunchoi/qimera main.py]:
``u = norm(Embedding(y) + noise_scale * z)`` (normalisation without affine parameters), then the
optional *disentanglement mapping* ``Linear(latent_dim, intermediate_dim)`` (``mapping``; on in
every official run), then, for a mixed batch (``labels`` of shape (B, K) with weights ``mix`` (B, K)),
the weighted sum over the K embeddings. The normalisation follows the official
``BatchNorm1d(...)(x.T).T`` exactly: for one label per image each image's vector is standardised over
its ``latent_dim`` entries; for K labels each of the K slots is standardised over the batch and the
entries. With ``cond="cbn"`` the conditional BNs mix their gamma/beta the same way, averaged over
the K slots (the official ``(w * mix).mean(1)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from ..errors import BadValueError

CONDITIONINGS = ("embed", "cbn", "none")


class CategoricalBN2d(nn.BatchNorm2d):
    """BatchNorm2d without own affine parameters followed by a per-class ``gamma, beta``
    (``Embedding`` tables, gamma = 1, beta = 0 at start); ``mix`` (B, K) averages the weighted
    per-slot parameters of labels (B, K) (Qimera's quirk: a mean over K, not a sum)."""

    def __init__(self, num_classes: int, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, labels: Tensor, mix: Tensor | None = None) -> Tensor:  # type: ignore[override]
        g, b = self.gamma(labels), self.beta(labels)
        if mix is not None:
            g, b = (g * mix.unsqueeze(-1)).mean(1), (b * mix.unsqueeze(-1)).mean(1)
        return super().forward(x) * g[:, :, None, None] + b[:, :, None, None]


class SuperposedEmbedding(nn.Module):
    """Qimera's generator input: ``norm(Embedding(y) + noise_scale * z)`` [-> mapping], mixed over K."""

    def __init__(self, num_classes: int, latent_dim: int, intermediate_dim: int | None, noise_scale: float = 1.0):
        super().__init__()
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.noise_scale = float(noise_scale)
        self.mapping = nn.Linear(latent_dim, intermediate_dim) if intermediate_dim else None
        self.out_dim = intermediate_dim or latent_dim

    def forward(self, z: Tensor, labels: Tensor, mix: Tensor | None = None) -> Tensor:
        u = self.embed(labels) + self.noise_scale * z
        dims = (-1,) if mix is None else (0, 2)  # the official BatchNorm1d on the transposed tensor
        var, mean = torch.var_mean(u, dims, correction=0, keepdim=True)
        u = (u - mean) * torch.rsqrt(var + 1e-5)
        if self.mapping is not None:
            u = self.mapping(u)
        return u if mix is None else (u * mix.unsqueeze(-1)).sum(1)


class GDFQGenerator(nn.Module):
    """The GDFQ-lineage generator (module docstring). ``forward(z, labels=None, mix=None)`` returns
    ``(B, channels, image_size, image_size)`` images; ``z`` is (B, latent_dim), or (B, K, latent_dim)
    with ``labels`` (B, K) and ``mix`` (B, K) for Qimera's mixed batches."""

    def __init__(self, num_classes: int, image_size: int = 32, latent_dim: int = 100, channels: int = 3,
                 cond: str = "embed", superpose: bool = False, intermediate_dim: int | None = None,
                 noise_scale: float = 1.0, body_eps: float = 0.8):
        super().__init__()
        if cond not in CONDITIONINGS:
            raise BadValueError(f"generator conditioning must be one of {', '.join(CONDITIONINGS)}, got '{cond}'")
        if image_size % 4 or image_size < 4:
            raise BadValueError(f"the GDFQ generator needs an image size divisible by 4, got {image_size}")
        if superpose and cond == "none":
            raise BadValueError("a superposed (Qimera) generator needs labels: cond 'embed' or 'cbn'")
        self.num_classes, self.latent_dim, self.cond = int(num_classes), int(latent_dim), cond
        self.image_size, self.init_size = int(image_size), int(image_size) // 4
        self.superpose = bool(superpose)
        if superpose:
            self.input = SuperposedEmbedding(num_classes, latent_dim, intermediate_dim, noise_scale)
            in_dim = self.input.out_dim
        else:
            self.label_emb = nn.Embedding(num_classes, latent_dim) if cond == "embed" else None
            in_dim = latent_dim
        self.l1 = nn.Linear(in_dim, 128 * self.init_size ** 2)

        def bn(c: int, eps: float) -> nn.Module:
            return CategoricalBN2d(num_classes, c, eps) if cond == "cbn" else nn.BatchNorm2d(c, eps=eps)

        self.bn0 = bn(128, 1e-5)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = bn(128, body_eps)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = bn(64, body_eps)
        self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def _bn(self, m: nn.Module, x: Tensor, labels: Tensor | None, mix: Tensor | None) -> Tensor:
        return m(x, labels, mix) if self.cond == "cbn" else m(x)

    def forward(self, z: Tensor, labels: Tensor | None = None, mix: Tensor | None = None) -> Tensor:
        if self.cond != "none" and labels is None:
            raise BadValueError("this generator is conditional: pass labels")
        if self.superpose:
            h = self.input(z, labels, mix)
        elif self.cond == "embed":
            h = self.label_emb(labels) * z
        else:
            h = z
        x = self.l1(h).view(h.shape[0], 128, self.init_size, self.init_size)
        x = F.interpolate(self._bn(self.bn0, x, labels, mix), scale_factor=2)
        x = F.leaky_relu(self._bn(self.bn1, self.conv1(x), labels, mix), 0.2)
        x = F.interpolate(x, scale_factor=2)
        x = F.leaky_relu(self._bn(self.bn2, self.conv2(x), labels, mix), 0.2)
        return self.out_bn(torch.tanh(self.conv3(x)))


def make_generator(num_classes: int, image_size: int, *, latent_dim: int = 100, cond: str | None = None,
                   superpose: bool = False, intermediate_dim: int | None = None, noise_scale: float = 1.0,
                   channels: int = 3) -> GDFQGenerator:
    """The lineage's generator for an image size: ``cond`` defaults to ``"embed"`` below 64 px
    (the CIFAR generator) and ``"cbn"`` from 64 px on (the ImageNet generator)."""
    if cond is None:
        cond = "embed" if image_size < 64 else "cbn"
    return GDFQGenerator(num_classes, image_size, latent_dim, channels, cond, superpose, intermediate_dim,
                         noise_scale)



class ContentStyleGenerator(GDFQGenerator):
    """Causal-DFQ's content-style-decoupled generator (Shang et al., ICCV 2023; no public code: the
    architecture here is zsq's, **unverified**): the GDFQ body (module docstring) fed the *content*
    (the class and a content latent, through ``cond`` as GDFQ), with a *style* latent ``s``
    (``style_dim``) modulating every hidden BN output AdaIN-style, ``bn(x) * (1 + gamma_l(s)) +
    beta_l(s)`` with one ``Linear(style_dim, 2 C_l)`` per BN. ``forward(z, labels)`` takes ``z`` =
    ``[content (latent_dim) | style (style_dim)]``, so that the same content with another style is
    an intervention ``do(style)`` on the image."""

    def __init__(self, num_classes: int, image_size: int = 32, latent_dim: int = 100, style_dim: int = 32,
                 channels: int = 3, cond: str = "embed"):
        if cond == "none":
            raise BadValueError("the content-style generator is conditional: cond 'embed' or 'cbn'")
        super().__init__(num_classes, image_size, latent_dim, channels, cond)
        self.style_dim = int(style_dim)
        self.style = nn.ModuleList(nn.Linear(self.style_dim, 2 * c) for c in (128, 128, 64))
        self._s: Tensor | None = None

    def _bn(self, m: nn.Module, x: Tensor, labels: Tensor | None, mix: Tensor | None) -> Tensor:
        x = super()._bn(m, x, labels, mix)
        i = next(i for i, bn in enumerate((self.bn0, self.bn1, self.bn2)) if bn is m)
        gamma, beta = self.style[i](self._s).chunk(2, dim=1)
        return x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]

    def forward(self, z: Tensor, labels: Tensor | None = None, mix: Tensor | None = None) -> Tensor:
        if z.shape[-1] != self.latent_dim + self.style_dim:
            raise BadValueError(f"the content-style generator takes z of width {self.latent_dim} + {self.style_dim} "
                                f"(content + style), got {z.shape[-1]}")
        self._s = z[:, self.latent_dim:]
        try:
            return super().forward(z[:, :self.latent_dim], labels, mix)
        finally:
            self._s = None

# -- AutoReCon: the searched generator ---------------------------------------------------------------------
#: cell operations, upsamplings and cross-cell upsamplings of AutoReCon's search space
ARC_OPS = ("none", "skip_connect", "conv_1x1", "conv_3x3", "conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
ARC_UPS = ("nearest", "bilinear")
ARC_CROSS = ("none_up", "nearest", "bilinear")

#: the derived architectures (one-hot rows of the official tensors as indices into the tuples above):
#: 6 upsamplings, 15 operations, 12 cross connections [code: iamkanghyunchoi/ait
#: AutoReCon_AIT/generator_architecture.py gen_cifar10, gen_cifar100, gen_resnet18]
ARC_GENOTYPES: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "cifar10": ((0, 0, 0, 0, 1, 0), (6, 0, 6, 5, 4, 6, 6, 3, 5, 6, 6, 6, 2, 4, 5),
                (0, 0, 2, 0, 0, 1, 1, 1, 1, 2, 2, 2)),
    "cifar100": ((1, 0, 0, 0, 0, 0), (6, 6, 6, 0, 4, 6, 4, 2, 5, 6, 6, 5, 4, 4, 6),
                 (0, 2, 1, 0, 0, 1, 0, 2, 1, 1, 2, 2)),
    "resnet18": ((1, 1, 1, 1, 1, 1), (6, 6, 6, 6, 6, 6, 6, 6, 6, 5, 6, 6, 4, 5, 5),
                 (1, 2, 1, 2, 2, 1, 2, 2, 1, 1, 2, 1)),
}


class _ArcOp(nn.Module):
    """One searched edge: ``none`` (zeros), ``skip_connect``, or conditional BN -> LeakyReLU -> conv;
    with ``up`` a x2 interpolation first and a 1x1 conv (the code's ``Up``); ``none_up`` = zeros of the
    upsampled size (the code computes an ``Up`` and multiplies it by 0)."""

    def __init__(self, kind: str, num_classes: int, ch: int, up: str | None = None):
        super().__init__()
        self.kind, self.up = kind, up
        k, dil = {"conv_1x1": (1, 1), "conv_3x3": (3, 1), "conv_5x5": (5, 1), "dil_conv_3x3": (3, 2),
                  "dil_conv_5x5": (5, 2), "up": (1, 1)}.get(kind, (0, 0))
        if k:
            self.bn = CategoricalBN2d(num_classes, ch, 0.8)
            self.conv = nn.Conv2d(ch, ch, k, padding=dil * (k // 2), dilation=dil)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        if self.up is not None:
            if self.kind == "none":
                return x.new_zeros(x.shape[0], x.shape[1], 2 * x.shape[2], 2 * x.shape[3])
            x = F.interpolate(x, scale_factor=2, mode=self.up)
        if self.kind == "none":
            return x * 0.0
        if self.kind == "skip_connect":
            return x
        return self.conv(F.leaky_relu(self.bn(x, labels), 0.2))


class _ArcCell(nn.Module):
    """A searched cell: two upsampled inputs, three inner edges, and (after the first cell) six
    cross edges from the previous cell's nodes."""

    def __init__(self, num_classes: int, ch: int, ups: tuple[int, ...], ops: tuple[int, ...],
                 cross: tuple[int, ...] | None):
        super().__init__()
        self.ups = nn.ModuleList(_ArcOp("up", num_classes, ch, ARC_UPS[u]) for u in ups)
        self.ops = nn.ModuleList(_ArcOp(ARC_OPS[o], num_classes, ch) for o in ops)
        self.cross = None if cross is None else nn.ModuleList(
            _ArcOp("none" if c == 0 else "up", num_classes, ch, ARC_CROSS[c] if c else "nearest") for c in cross)

    def forward(self, x: Tensor, prev: tuple[Tensor, Tensor, Tensor] | None, labels: Tensor):
        n0, n1 = self.ups[0](x, labels), self.ups[1](x, labels)
        n2 = self.ops[0](n0, labels) + self.ops[1](n1, labels)
        if self.cross is not None:
            n2 = n2 + sum(self.cross[i](prev[i], labels) for i in range(3))
        n3 = self.ops[2](n0, labels) + self.ops[3](n1, labels) + self.ops[4](n2, labels)
        if self.cross is not None:
            n3 = n3 + sum(self.cross[3 + i](prev[i], labels) for i in range(3))
        return n3, (n0, n1, n2)


class AutoReConGenerator(nn.Module):
    """AutoReCon's searched conditional generator [code: iamkanghyunchoi/ait AutoReCon_AIT/model_generator.py]:
    ``z`` split in three (latent // 3, latent // 3, rest) -> three linear maps to 64-channel inputs at
    s/8, s/4, s/2; three searched cells (x2 each, the later ones fed the previous cell's output plus
    the next input and its nodes through cross edges), conditional BN everywhere (eps 0.8), then
    conditional BN -> LeakyReLU -> conv3x3 -> tanh -> BN(3, affine=False)."""

    def __init__(self, num_classes: int, image_size: int = 32, latent_dim: int = 100, genotype: str = "cifar10",
                 channels: int = 3):
        super().__init__()
        if image_size % 8:
            raise BadValueError(f"the AutoReCon generator needs an image size divisible by 8, got {image_size}")
        if genotype not in ARC_GENOTYPES:
            from ..errors import UnknownNameError

            raise UnknownNameError("AutoReCon genotype", genotype, ARC_GENOTYPES)
        ups, ops, cross = ARC_GENOTYPES[genotype]
        self.num_classes, self.latent_dim, self.image_size, self.cond = num_classes, latent_dim, image_size, "cbn"
        self.ch, self.bottom = 64, image_size // 8
        self.splits = (latent_dim // 3, latent_dim // 3, latent_dim - 2 * (latent_dim // 3))
        self.inputs = nn.ModuleList(nn.Linear(d, self.ch * (self.bottom * 2 ** i) ** 2)
                                    for i, d in enumerate(self.splits))
        self.cells = nn.ModuleList(
            _ArcCell(num_classes, self.ch, ups[2 * i:2 * i + 2], ops[5 * i:5 * i + 5],
                     None if i == 0 else cross[6 * (i - 1):6 * i])
            for i in range(3))
        self.out_cbn = CategoricalBN2d(num_classes, self.ch, 0.8)
        self.to_rgb = nn.Conv2d(self.ch, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: Tensor, labels: Tensor | None = None, mix: Tensor | None = None) -> Tensor:
        if labels is None or mix is not None:
            raise BadValueError("the AutoReCon generator takes one label per image")
        parts = torch.split(z, self.splits, dim=1)
        ins = [lin(p).view(z.shape[0], self.ch, self.bottom * 2 ** i, self.bottom * 2 ** i)
               for i, (lin, p) in enumerate(zip(self.inputs, parts))]
        x, prev = ins[0], None
        for i, cell in enumerate(self.cells):
            x, prev = cell(x if i == 0 else x + ins[i], prev, labels)
        return self.out_bn(torch.tanh(self.to_rgb(F.leaky_relu(self.out_cbn(x, labels), 0.2))))
