"""Losses shared by every synthesizer: BN-statistics matching (BNS) and the input-image prior.

One implementation of the four BNS variants found in official code (``methods.md`` C.1), chosen
with switches rather than copied four times:

=================  ========  ==========  =========  ==========  =====================================
variant            stats     dispersion  unbiased   reduction   extra
=================  ========  ==========  =========  ==========  =====================================
``gdfq``           batch     var         no         ``mse``     layers averaged (GDFQ, Qimera, IntraQ,
                                                                HAST, AdaSG, SynQ)
``genie``          batch     std         yes        ``sql2_c``  input prior; data std without eps
``zeroq``          image     std         yes        ``sql2_b``  input prior; std = sqrt(var + 1e-6)
``deepinversion``  batch     var         no         ``l2``      first BN layer weighted x10
=================  ========  ==========  =========  ==========  =====================================

For BN layer ``l`` with input ``a_l`` (B, C, H, W) and running statistics ``mu_l``, ``sigma_l^2``:

* ``stats="batch"``: statistics over (B, H, W) -> shape (C,); ``stats="image"``: over (H, W) for each
  image -> shape (B, C) (ZeroQ). No Python loop over images.
* ``dispersion="var"``: compare ``var(a_l)`` with ``sigma_l^2``; ``"std"``: compare
  ``sqrt(var(a_l) + data_eps)`` with ``sqrt(sigma_l^2 + eps)``.
* the differences ``D`` (mean and dispersion) are reduced per layer by

  - ``mse``: ``mean(D^2)``, and the layers are **averaged** (GDFQ: ``(1/L) sum_l``);
  - ``sql2_c``: ``||D||^2 / C``, layers summed (Genie's ``l2_loss`` on (C,) vectors);
  - ``sql2_b``: ``||D||^2 / B``, layers summed (ZeroQ's ``own_loss`` on (B, C) matrices);
  - ``l2``: ``||D||_2`` (unsquared Frobenius norm), layers summed (DeepInversion);
  - ``kl``: ``sum_c KL(N(mean_c, var_c) || N(mu_c, sigma_c^2))`` (the batch statistics read as a
    per-channel Gaussian; needs ``dispersion="var"``), layers averaged (GZNQ's reading of BNS as
    matching distributions, zsq's formulation).

* optional per-layer weights ``w_l`` multiply each layer's term (DeepInversion: 10 on the first BN);
* optional hinge ``margin`` (DSG's slack alignment): every difference becomes
  ``max(0, |D| - m)`` before the reduction (elementwise; ``m`` a scalar or per-layer per-channel).

* optional per-image, per-layer ``sample_weights`` (:meth:`BNStatsLoss.loss`, per-image statistics
  only): DSG's layerwise sample enhancement gives each image an extra weight on one layer.

The input-image prior (ZeroQ, Genie) pushes each image's per-channel mean to 0 and std to 1 in the
normalised input space: ``||mean_x||^2 / B + ||std_x - 1||^2 / B`` with per-image statistics.
The pixel priors of DeepInversion (:func:`tv_loss`, :func:`l2_image_loss`) live here as well.

Use as a context manager so the hooks never outlive the synthesis::

    with BNStatsLoss.preset("zeroq", model) as bns:
        model(x)
        loss = bns.loss()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import BadValueError

STATS = ("batch", "image")
DISPERSIONS = ("var", "std")
REDUCTIONS = ("mse", "sql2_c", "sql2_b", "l2", "kl")

#: Named settings of :class:`BNStatsLoss` reproducing each official implementation (methods.md C.1).
BNS_VARIANTS: dict[str, dict[str, Any]] = {
    # xushoukai/GDFQ trainer.py: mse(batch mean, mu) + mse(batch biased var, sigma^2), / n_layers
    "gdfq": dict(stats="batch", dispersion="var", unbiased=False, reduction="mse", input_prior=False),
    # SamsungLabs/Genie distill.py: torch.std_mean(bn_input, [0,2,3]) (unbiased, no eps) vs
    # sqrt(running_var + 1e-6); l2_loss = ||.||^2 / size(0) = / C; + per-image input prior
    "genie": dict(stats="batch", dispersion="std", unbiased=True, eps=1e-6, data_eps=0.0, reduction="sql2_c",
                  input_prior=True),
    # amirgholami/ZeroQ distill_data.py: per-image mean / sqrt(var_unbiased + 1e-6) over H*W vs
    # running stats; own_loss = ||.||^2 / B; + the same term on the input against mean 0 / std 1
    "zeroq": dict(stats="image", dispersion="std", unbiased=True, eps=1e-6, data_eps=1e-6, reduction="sql2_b",
                  input_prior=True),
    # NVlabs/DeepInversion deepinversion.py: ||var - sigma^2||_2 + ||mean - mu||_2 (biased var),
    # first_bn_multiplier 10 (the r_feature weight 0.01-0.05 is the recipe's, not applied here)
    "deepinversion": dict(stats="batch", dispersion="var", unbiased=False, reduction="l2", input_prior=False,
                          first_layer_weight=10.0),
}


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BatchNorm2d modules with running statistics, in ``named_modules`` order."""
    return [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None
    ]


def _upcast(t: Tensor) -> Tensor:
    """float32 for half / bf16 (autocast) tensors; float64 stays float64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class _FusedVarMean(torch.autograd.Function):
    """Mean and variance over ``dims`` with a one-pass elementwise backward.

    ``d var / d a = 2 (a - mean) / (n - correction)`` (the mean's own dependence cancels because
    the centred values sum to zero) and ``d mean / d a = 1 / n``: one ``addcmul`` instead of
    autograd's chain of square / sub / expand. First-order only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, a: Tensor, dims: tuple[int, ...], correction: int):
        n = 1
        for d in dims:
            n *= a.shape[d]
        mean = a.mean(dims, keepdim=True)
        centred = a - mean
        var = torch.square(centred).sum(dims, keepdim=True) / max(n - correction, 1)
        ctx.save_for_backward(centred)
        ctx.scales = (2.0 / max(n - correction, 1), 1.0 / n)
        return var, mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_var: Tensor, g_mean: Tensor):
        (centred,) = ctx.saved_tensors
        return torch.addcmul(g_mean * ctx.scales[1], centred, g_var * ctx.scales[0]), None, None


def var_mean(a: Tensor, dims: tuple[int, ...], correction: int, fused: bool = True) -> tuple[Tensor, Tensor]:
    """Variance and mean over ``dims`` (two-pass: mean, then centred sum of squares).

    Same values as ``torch.var_mean`` and as stable, but faster forward + backward on CPU for the
    BN-input shapes synthesis sees (ResNet-20 activations, batch 256, 1 thread: ``torch.var_mean``
    35-60 ms, two-pass autograd 13-18 ms, fused backward 6 ms). ``fused=False`` keeps plain autograd
    (needed only for higher-order gradients through the statistics).
    """
    if fused and torch.is_grad_enabled() and a.requires_grad:
        var, mean = _FusedVarMean.apply(a, tuple(dims), int(correction))
    else:
        n = 1
        for d in dims:
            n *= a.shape[d]
        mean = a.mean(dims, keepdim=True)
        var = torch.square(a - mean).sum(dims, keepdim=True) / max(n - correction, 1)
    keep = [s for i, s in enumerate(a.shape) if i not in {d % a.dim() for d in dims}]
    return var.reshape(keep), mean.reshape(keep)


def _reduce(d: Tensor, reduction: str, batch: int) -> Tensor:
    if reduction == "mse":
        return d.pow(2).mean()
    if reduction == "sql2_c":
        return d.pow(2).sum() / d.shape[-1]
    if reduction == "sql2_b":
        return d.pow(2).sum() / batch
    return torch.linalg.vector_norm(d)  # "l2"


def image_prior_loss(x: Tensor, unbiased: bool = True, data_eps: float = 1e-6, fused: bool = True) -> Tensor:
    """Per-image channel mean -> 0 and std -> 1: ``(||mean||^2 + ||std - 1||^2) / B`` (ZeroQ, Genie).

    ``std = sqrt(var + data_eps)`` over the spatial positions of each image and channel.
    """
    var, mean = var_mean(_upcast(x), (2, 3), int(unbiased), fused)
    std = torch.sqrt(var + data_eps) if data_eps else torch.sqrt(var)
    b = x.shape[0]
    return (mean.pow(2).sum() + (std - 1.0).pow(2).sum()) / b


def _neighbour_diffs(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Differences to the right, down, and the two diagonal neighbours (DeepInversion's four)."""
    return (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
            x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])


def tv_loss(x: Tensor, kind: str = "l2") -> Tensor:
    """Total variation of a batch as DeepInversion computes it (``get_image_prior_losses``).

    ``l2``: the sum over the four neighbour directions of the (unsquared) Frobenius norm of the
    whole batch's differences; ``l1``: the sum over the directions of the mean absolute difference.
    """
    diffs = _neighbour_diffs(_upcast(x))
    if kind == "l2":
        return sum(torch.linalg.vector_norm(d) for d in diffs)
    if kind == "l1":
        return sum(d.abs().mean() for d in diffs)
    raise BadValueError(f"tv_loss kind must be l1 or l2, got '{kind}'")


def l2_image_loss(x: Tensor) -> Tensor:
    """Mean over the batch of each image's L2 norm (DeepInversion's ``loss_l2``)."""
    return torch.linalg.vector_norm(_upcast(x).flatten(1), dim=1).mean()


class BNStatsLoss:
    """BN-statistics matching loss on a model's BatchNorm2d inputs (+ optional input prior).

    Args:
        model: the network whose BN running statistics are the targets (left unchanged).
        stats: ``"batch"`` or ``"image"`` (per-image statistics, ZeroQ).
        dispersion: ``"var"`` or ``"std"``.
        reduction: ``"mse"``, ``"sql2_c"``, ``"sql2_b"``, ``"l2"`` or ``"kl"`` (module docstring).
        unbiased: Bessel-corrected variance (ZeroQ/Genie use ``torch.var``/``torch.std`` defaults).
        eps: added to the running variance before ``sqrt`` (``dispersion="std"``).
        data_eps: added to the data variance before ``sqrt``; ``None`` = ``eps``.
        layer_weights: per-layer multipliers: a sequence (one per BN layer, in module order) or a
            mapping ``{bn_module_name: weight}`` (missing names weigh 1).
        first_layer_weight: shortcut for DeepInversion's ``first_bn_multiplier``.
        margin: hinge slack: ``None``, a scalar, or a sequence with one ``(m_mean, m_disp)`` pair per
            layer (each a scalar or a (C,) tensor); differences become ``max(0, |D| - m)``.
        mean_weight, disp_weight: weights of the mean and dispersion terms.
        input_prior: add :func:`image_prior_loss` of the model input (captured by a forward
            pre-hook on ``model``), times ``prior_weight``.
        modules: restrict to these BN modules (default: every BatchNorm2d with running stats).
        fused: use the fused first-order statistics backward (:func:`var_mean`); ``False`` for
            higher-order gradients through the loss.

    Statistics are computed in float32 inside the forward hooks (so bf16 autocast forwards are
    fine); the last forward inside the ``with`` block is the one :meth:`loss` reduces.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        stats: str = "batch",
        dispersion: str = "std",
        reduction: str = "sql2_c",
        unbiased: bool = True,
        eps: float = 1e-6,
        data_eps: float | None = None,
        layer_weights: Sequence[float] | Mapping[str, float] | None = None,
        first_layer_weight: float | None = None,
        margin: float | Sequence[tuple[Any, Any]] | None = None,
        mean_weight: float = 1.0,
        disp_weight: float = 1.0,
        input_prior: bool = False,
        prior_weight: float = 1.0,
        modules: Sequence[nn.BatchNorm2d] | None = None,
        fused: bool = True,
    ):
        for val, allowed, what in ((stats, STATS, "stats"), (dispersion, DISPERSIONS, "dispersion"),
                                   (reduction, REDUCTIONS, "reduction")):
            if val not in allowed:
                raise BadValueError(f"BNStatsLoss {what} must be one of {', '.join(allowed)}, got '{val}'")
        if reduction == "kl" and (dispersion != "var" or margin):
            raise BadValueError("BNStatsLoss reduction 'kl' needs dispersion='var' and no margin")
        self.model = model
        self.stats, self.dispersion, self.reduction = stats, dispersion, reduction
        self.unbiased = bool(unbiased)
        self.eps = float(eps)
        self.data_eps = self.eps if data_eps is None else float(data_eps)
        self.mean_weight, self.disp_weight = float(mean_weight), float(disp_weight)
        self.input_prior, self.prior_weight = bool(input_prior), float(prior_weight)
        self.fused = bool(fused)

        named = bn_layers(model)
        if modules is not None:
            ids = {id(m) for m in modules}
            named = [(n, m) for n, m in named if id(m) in ids]
        if not named:
            raise BadValueError(f"{type(model).__name__} has no BatchNorm2d layer with running statistics: "
                                "BN-statistics synthesis needs one (pick a synthesizer without BNS, e.g. gaussian)")
        self.names = [n for n, _ in named]
        self.modules = [m for _, m in named]
        n_layers = len(self.modules)

        w = [1.0] * n_layers
        if isinstance(layer_weights, Mapping):
            unknown = set(layer_weights) - set(self.names)
            if unknown:
                raise BadValueError(f"layer_weights names no BN layer: {', '.join(sorted(unknown))}")
            w = [float(layer_weights.get(n, 1.0)) for n in self.names]
        elif layer_weights is not None:
            w = [float(v) for v in layer_weights]
            if len(w) != n_layers:
                raise BadValueError(f"layer_weights has {len(w)} values for {n_layers} BN layers")
        if first_layer_weight is not None:
            w[0] *= float(first_layer_weight)
        self.layer_weights = w

        if margin is None or isinstance(margin, (int, float)):
            self.margins = None if not margin else [(float(margin), float(margin))] * n_layers
        else:
            margins = list(margin)
            if len(margins) != n_layers:
                raise BadValueError(f"margin has {len(margins)} entries for {n_layers} BN layers")
            self.margins = [(self._as_margin(a), self._as_margin(b)) for a, b in margins]

        # targets, fp32, computed once
        self._mu: list[Tensor] = []
        self._disp: list[Tensor] = []
        for m in self.modules:
            rv = m.running_var.detach().float()
            self._mu.append(m.running_mean.detach().float().clone())
            self._disp.append(torch.sqrt(rv + self.eps) if dispersion == "std" else rv.clone())

        self._handles: list[Any] = []
        self._diffs: list[tuple[Tensor, Tensor, int] | None] = [None] * n_layers
        self._input: Tensor | None = None

    @staticmethod
    def _as_margin(m):
        return m.detach().float() if isinstance(m, Tensor) else float(m)

    @classmethod
    def preset(cls, variant: str, model: nn.Module, **overrides) -> BNStatsLoss:
        """A :data:`BNS_VARIANTS` setting (``gdfq``, ``genie``, ``zeroq``, ``deepinversion``) + overrides."""
        if variant not in BNS_VARIANTS:
            from ..errors import UnknownNameError

            raise UnknownNameError("BNS variant", variant, BNS_VARIANTS)
        return cls(model, **{**BNS_VARIANTS[variant], **overrides})

    # -- hooks -----------------------------------------------------------------------------------
    def _make_hook(self, idx: int):
        dims = (0, 2, 3) if self.stats == "batch" else (2, 3)
        corr = int(self.unbiased)

        def hook(module, inputs, output):
            a = inputs[0]
            var, mean = var_mean(_upcast(a), dims, corr, self.fused)
            if self.dispersion == "std":
                var = torch.sqrt(var + self.data_eps) if self.data_eps else torch.sqrt(var)
            mu, disp = self._mu[idx], self._disp[idx]
            if mu.device != mean.device or mu.dtype != mean.dtype:
                self._mu[idx] = mu = mu.to(mean.device, mean.dtype)
                self._disp[idx] = disp = disp.to(mean.device, mean.dtype)
            self._diffs[idx] = (mean - mu, var - disp, a.shape[0])

        return hook

    def _input_hook(self, module, args):
        if args and isinstance(args[0], Tensor):
            self._input = args[0]

    def __enter__(self) -> BNStatsLoss:
        self.register()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def register(self) -> BNStatsLoss:
        """Attach the hooks (``__enter__`` does this)."""
        if self._handles:
            return self
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._make_hook(i)))
        if self.input_prior:
            self._handles.append(self.model.register_forward_pre_hook(self._input_hook))
        return self

    def remove(self) -> None:
        """Detach the hooks and drop captured tensors (``__exit__`` does this)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self._diffs = [None] * len(self.modules)
        self._input = None

    # -- the loss ----------------------------------------------------------------------------------
    def _hinge(self, d: Tensor, m) -> Tensor:
        if isinstance(m, Tensor):
            m = m.to(d.device)
        elif m == 0:
            return d
        return torch.relu(d.abs() - m)

    def _layer_diffs(self):
        """``(i, D_mean, D_disp, batch)`` per layer of the last forward, margins applied."""
        for i, item in enumerate(self._diffs):
            if item is None:
                raise RuntimeError(f"BN layer '{self.names[i]}' saw no input: call the model inside the "
                                   "BNStatsLoss context before loss()")
            dm, dd, b = item
            if self.margins is not None:
                dm, dd = self._hinge(dm, self.margins[i][0]), self._hinge(dd, self.margins[i][1])
            yield i, dm, dd, b

    def _kl(self, i: int, dm: Tensor, dd: Tensor) -> Tensor:
        """``KL(N(mu + dm, s2 + dd) || N(mu, s2))`` per channel, ``s2 = running_var + eps``."""
        r = dd / (self._disp[i] + self.eps)  # (var - s2) / s2 up to eps
        return 0.5 * (self.mean_weight * dm.pow(2) / (self._disp[i] + self.eps)
                      + self.disp_weight * (r - torch.log1p(r)))

    def layer_losses(self) -> Tensor:
        """Per-layer terms ``mean_weight * r(D_mean) + disp_weight * r(D_disp)`` (unweighted by layer)."""
        out = []
        for i, dm, dd, b in self._layer_diffs():
            if self.reduction == "kl":
                out.append(self._kl(i, dm, dd).sum(-1).mean())
            else:
                out.append(self.mean_weight * _reduce(dm, self.reduction, b)
                           + self.disp_weight * _reduce(dd, self.reduction, b))
        return torch.stack(out)

    def image_layer_losses(self) -> Tensor:
        """(L, B): each image's share of each layer's term; summed over images = :meth:`layer_losses`.

        Per-image statistics (``stats="image"``) with a separable reduction only (not ``l2``): with
        batch statistics no image has a term of its own.
        """
        if self.stats != "image" or self.reduction == "l2":
            raise BadValueError("per-image BNS terms need stats='image' and a reduction other than 'l2'")
        out = []
        for i, dm, dd, b in self._layer_diffs():
            if self.reduction == "kl":
                out.append(self._kl(i, dm, dd).sum(-1) / b)
                continue
            per = self.mean_weight * dm.pow(2).sum(-1) + self.disp_weight * dd.pow(2).sum(-1)
            div = {"mse": dm.numel(), "sql2_c": dm.shape[-1], "sql2_b": b}[self.reduction]
            out.append(per / div)
        return torch.stack(out)

    def loss(self, x: Tensor | None = None, parts: bool = False, sample_weights: Tensor | None = None):
        """The total loss of the last forward; ``x`` overrides the captured input for the prior.

        ``sample_weights`` (L, B), per-image statistics only: image ``b``'s term of layer ``l`` is
        multiplied by ``sample_weights[l, b]`` (on top of the layer weights; all ones = the plain
        loss). With ``parts=True`` returns ``(total, {"bns": ..., "prior": ...})`` (tensors).
        """
        if sample_weights is None:
            per_layer = self.layer_losses()
        else:
            per_image = self.image_layer_losses()
            if tuple(sample_weights.shape) != tuple(per_image.shape):
                raise BadValueError(f"sample_weights must have shape {tuple(per_image.shape)} (layers, images), "
                                    f"got {tuple(sample_weights.shape)}")
            per_layer = (per_image * sample_weights.to(per_image)).sum(1)
        w = torch.tensor(self.layer_weights, dtype=per_layer.dtype, device=per_layer.device)
        bns = (per_layer * w).sum()
        if self.reduction in ("mse", "kl"):
            bns = bns / len(self.modules)
        total = bns
        prior = None
        if self.input_prior:
            x = self._input if x is None else x
            if x is None:
                raise RuntimeError("input prior needs the model input: call the model inside the context")
            prior = self.prior_weight * image_prior_loss(x, self.unbiased, self.data_eps, self.fused)
            total = total + prior
        if parts:
            return total, {"bns": bns, "prior": prior if prior is not None else torch.zeros_like(bns)}
        return total
