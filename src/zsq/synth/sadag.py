"""``sadag``: Sharpness-Aware Data Generation (Hoang-Anh, Pham, Le, Cai, Do; ICML 2024), on Genie-D.

Source: the paper (methods.md A.3; **no public code**). SADAG adds to Genie-D's data generation a
term that makes the quantized model flat on unseen real data. With the reconstruction loss
``L_R(theta_Q, X) = sum_i sum_l ||f_l(theta_FP, x_i) - f_l(theta_Q, x_i)||^2``, the sharpness-aware
objective reduces (first order) to *maximising the match between* ``grad_theta L_R`` *on the
synthetic data and on real data*; real data being absent, each synthetic sample is matched with its
**neighbours**. Everything of Genie-D is kept unchanged (:class:`~zsq.synth.genie.Genie`: per-batch
generator + latents, optimisers and schedules, swing convolution, Genie's BNS loss); the term enters
through :meth:`Genie.extra_loss`, so the data are ``argmin BNS + lambda_gm * GM``.

The gradient-matching term GM, for one batch ``x`` (B images), as implemented here:

* **quantized model** ``Q``: :func:`~zsq.quant.protocol.apply_protocol` copy of the FP model with
  ``q_protocol`` / ``q_w_bits`` / ``q_a_bits`` (default ``genie-native`` W4A4, the paper's main
  setting and protocol), weight ranges by the L_p (p = 2.4) search ``mse`` observer, activation
  ranges by the ``mse`` observer on the **current** images at the term's first evaluation (hence
  ``gm_start``: on the first iterations' images the ranges would be meaningless), again every
  ``q_calib_every`` evaluations if > 0 (default 0: once; the L_p search over ~20 quantizers costs
  ~8 s at batch 128 on one CPU thread, 2-3 evaluations of the term). Built once per batch before the
  swing hooks exist, so ``Q`` has no swing convolution. The synthesizer does not
  see the ``--w/--a`` of the later quantization: the data are made against ``q_w_bits/q_a_bits``.
* **L_R taps**: the output (logits) and the input of the last quantized layer (penultimate
  features, e.g. ResNet's pooled features) of ``Q`` vs the same tensors of the FP model (``Q`` with
  every quantizer off: the same modules, so FP and quantized forwards differ by quantization only).
  Cheap (two small tensors per sample), generic (any classifier), and these taps carry the error of
  every earlier quantized layer. The paper sums over layers l; per-layer taps inside the last block
  would cost little more, taps before theta add nothing (their L_R does not depend on theta).
* **theta**: the FP ("shadow") weights feeding the weight quantizers of the **last** ``gm_layers``
  quantized Conv/Linear layers in forward order (default 3: ResNet-20's last block's two convs and
  the classifier, ~74k parameters; 0 = every quantized layer), differentiated through the STE. This
  is the parameter the reconstruction that follows (Genie-M: rounding + step of the same weights)
  moves; the last layers bound the per-sample gradient size (B x |theta|) and the inner backward.
* **per-sample gradients** ``g_i = d L_R(x_i) / d theta``: ``torch.func.vmap(grad(L_R))`` over
  ``functional_call(Q, theta, x_i)`` for the batch and its neighbours at once (one vectorised call,
  no loop over samples). The vmapped computation is recorded by the ordinary autograd graph, so
  ``backward`` of the term is the second-order path into the images, latents and generator.
* **neighbours**: ``n_neighbours`` copies ``x_i + rho * eps``, ``eps ~ N(0, I)`` per pixel (images are
  normalised, so ``rho`` is a fraction of the per-channel std), fresh draws at every evaluation from
  a stream seeded once from the batch generator. Gaussian neighbours are the paper's "perturbed
  samples"; they are not detached (both ``g_i`` and the neighbours' gradients move). ``rho = 0.1``
  (10% of a pixel's std, ~10% of the image norm): small next to the images, yet at W4A4 it already
  gives ``1 - cos`` ~0.75 (the rounding of many activations flips), so it is a neighbourhood the
  term can shrink; a smaller ``rho`` is the first ablation.
* **term** ``GM = lambda_gm * mean_{i,k} (1 - cos(g_i, g_i^k))`` in [0, 2 lambda_gm]; cosine, not
  the inner product, so the term cannot be lowered by shrinking or inflating ``L_R`` itself.
  ``lambda_gm = 0.1``: measured on ResNet-20 W4A4 (smoke, batch 32, 40 iterations) ``1 - cos`` sits
  at ~0.75 and, at weight 1, its image gradient is ~7x the BNS loss's at the end of the run (norms
  0.92 vs 0.12; BNS falls 22 -> 1.3); at 0.1 the two are of the same order late in the run and the
  BNS loss dominates early, so the data stay BN-matched. The ``default`` budget uses **0.03**, chosen
  on the validation split (``bench/sadag_ablation.py``: W3A3, proxy reconstruction, 3 seeds; val
  top-1 vs Genie-D on the same seeds: lambda 0.03 +0.64, 0.1 +0.07, 0.3 +0.41 (2 seeds), 1 -0.02
  (2 seeds); Genie-D given sadag's synthesis time +0.51, so most of the gain may be the extra
  iterations' worth, not the term); ``paper`` keeps 0.1.
* **schedule**: the term is applied at every ``gm_every``-th iteration from ``gm_start * iters`` on
  (the images of the first iterations are far from BN-matched, a quantized model calibrated on them
  tells little). ``gm_every`` bounds the cost (the term costs several forward/backward passes).
  Between applications the BNS-only loss drives the updates; the plateau schedule and the progress
  trace always see the BNS loss alone (:meth:`Genie.extra_loss`), so they do not jump with the term.

To ablate (none of this is verified against the authors): neighbours (Gaussian vs augmentations vs
detached neighbour gradients), ``rho`` (0.01-0.3), ``lambda_gm`` (0.01-1), ``gm_every`` / ``gm_start``,
theta (last block vs all layers; rounding/step parameters instead of weights), the L_R taps (all
block outputs) and the calibration bits / schedule of ``Q``.

Budgets: ``paper`` = Genie-D's paper budget (1,024 images x 4,000 iterations, fp32) with the term
at every iteration and 2 neighbours; ``default`` = Genie-D's default (256 x 300, bf16 BNS forward)
with the term (lambda 0.03) every 8th iteration from iteration 75, 1 neighbour (measured at batch 128 on ResNet-20,
1 thread, loaded machine: a Genie-D iteration 0.39 s, an iteration with the term 3.6 s, the one
activation calibration 8.4 s; so ~1.9x Genie-D's synthesis time); ``smoke`` = Genie-D's smoke
(32 x 20) with the term every 2nd iteration. The term always runs in fp32 (double backward through vmap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..errors import BadValueError
from ..quant.fake import fake_quant
from ..quant.modules import QUANT_LAYERS, Quantizer
from ..record import record_of
from .base import SYNTHESIZERS
from .genie import Genie, GenieConfig

_EXTRA_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"gm_every": 2, "n_neighbours": 1},
    "default": {"gm_every": 8, "n_neighbours": 1, "lambda_gm": 0.03},  # lambda chosen on the val split
    "paper": {},
}


@dataclass
class SadagConfig(GenieConfig):
    """Genie-D's settings plus the gradient-matching term (defaults: our choices, see the module doc)."""

    lambda_gm: float = 0.1  # weight of 1 - cos(g_i, g_neighbour)
    rho: float = 0.1  # neighbour = x + rho * N(0, I) (normalised input space)
    n_neighbours: int = 2  # neighbours per sample
    gm_every: int = 1  # apply the term every gm_every-th iteration ...
    gm_start: float = 0.25  # ... from iteration gm_start * iters on
    gm_layers: int = 3  # theta = weights of the last gm_layers quantized layers (0 = all)
    q_protocol: str = "genie-native"  # protocol / bits of the quantized model used by the term
    q_w_bits: int = 4
    q_a_bits: int = 4
    q_w_observer: str = "mse"
    q_a_observer: str = "mse"
    q_calib_every: int = 0  # activation ranges: calibrated at the first evaluation; again every k (0 = never)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        b: {**GenieConfig.PRESETS.get(b, {}), **_EXTRA_PRESETS[b]} for b in _EXTRA_PRESETS}

    def __post_init__(self):
        super().__post_init__()
        from ..quant.observers import OBSERVERS
        from ..spec import PROTOCOLS, check_bits

        if float(self.lambda_gm) < 0 or float(self.rho) <= 0:
            raise BadValueError(f"lambda_gm must be >= 0 and rho > 0, got {self.lambda_gm} and {self.rho}")
        if int(self.n_neighbours) < 1 or int(self.gm_every) < 1 or int(self.q_calib_every) < 0:
            raise BadValueError("n_neighbours and gm_every must be >= 1 and q_calib_every >= 0")
        if not 0.0 <= float(self.gm_start) < 1.0:
            raise BadValueError(f"gm_start is a fraction of the iterations in [0, 1), got {self.gm_start}")
        if int(self.gm_layers) < 0:
            raise BadValueError(f"gm_layers must be >= 0 (0 = every quantized layer), got {self.gm_layers}")
        PROTOCOLS[self.q_protocol]
        check_bits(self.q_w_bits, "q_w_bits")
        check_bits(self.q_a_bits, "q_a_bits")
        for obs in (self.q_w_observer, self.q_a_observer):
            if obs not in OBSERVERS:
                raise BadValueError(f"q observers must be one of {', '.join(OBSERVERS)}, got '{obs}'")


class _STEQuantizer(Quantizer):
    """A :class:`Quantizer` that never takes torch's fused fake-quant kernel: inside ``vmap(grad(.))``
    an activation that does not depend on theta looks gradient-free to :meth:`Quantizer.forward`, and
    the fused kernel has no vmap batching rule (torch falls back to a per-sample loop, with a warning,
    and the second-order path is not checked). Same integer grid (:func:`fake_quant`)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.mode != "quant":
            return super().forward(x)
        return fake_quant(x, self._shape(x, self.scale), self._shape(x, self.zero_point), self.qmin, self.qmax)


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[nn.Module]:
    """Every :class:`Quantizer` of ``model`` passes through (the FP network) inside the block."""
    qs = [m for m in model.modules() if isinstance(m, Quantizer)]
    modes = [q.mode for q in qs]
    for q in qs:
        q.mode = "off"
    try:
        yield model
    finally:
        for q, m in zip(qs, modes):
            q.mode = m


class GradientMatching:
    """SADAG's gradient-matching term for one batch (see the module docstring).

    Args:
        model: the FP network (not modified; a quantized copy is made).
        cfg: the :class:`SadagConfig`.
        image_shape: ``(C, H, W)`` of the images.
        generator: the stream of the neighbour noise.
    """

    #: samples (each with its neighbours) per piece of the second-order graph held at once (memory only:
    #: the result is the same for any size of at least a few samples; see :meth:`__call__`)
    chunk: int = 16

    def __init__(self, model: nn.Module, cfg: SadagConfig, image_shape: tuple[int, int, int],
                 generator: torch.Generator):
        from ..quant.protocol import apply_protocol
        from ..spec import PROTOCOLS

        self.cfg = cfg
        self.generator = generator
        device = generator.device
        self.dtype = next(model.parameters()).dtype  # fp32 (the term never runs under autocast)
        example = torch.zeros(2, *image_shape, device=device, dtype=self.dtype)
        self.q = apply_protocol(model, PROTOCOLS[cfg.q_protocol], cfg.q_w_bits, cfg.q_a_bits,
                                w_observer=cfg.q_w_observer, a_observer=cfg.q_a_observer, example=example)
        self.q.to(memory_format=torch.contiguous_format).eval()
        for p in self.q.parameters():
            p.requires_grad_(False)
        for name, m in self.q.named_modules():  # activation quantizers of this private copy only
            if isinstance(m, Quantizer) and not name.endswith("wq"):
                m.__class__ = _STEQuantizer
        layers = [n for n in record_of(self.q).layout.weights if isinstance(self.q.get_submodule(n), QUANT_LAYERS)]
        chosen = layers[-cfg.gm_layers:] if cfg.gm_layers else layers
        self.theta_names = [f"{n}.weight" for n in chosen]
        last = self.q.get_submodule(layers[-1])
        self._tap: list[Tensor] = []
        self.last_value: float | None = None
        last.register_forward_pre_hook(lambda mod, args: self._tap.append(args[0]))
        self.evaluations = 0

    # -- pieces --------------------------------------------------------------------------------------
    def theta(self) -> dict[str, Tensor]:
        """The differentiated parameters (detached views of the weights of the chosen layers)."""
        return {n: self.q.get_parameter(n).detach() for n in self.theta_names}

    def calibrate(self, x: Tensor) -> None:
        """Activation ranges of the quantized model from ``x`` (``q_a_observer``)."""
        from ..ptq.calibrate import calibrate

        calibrate(self.q, x.detach().to(self.dtype).contiguous(), observer=self.cfg.q_a_observer)
        for m in self.q.modules():  # calibrate() runs in inference mode: make the ranges autograd-usable
            if isinstance(m, _STEQuantizer):
                m.scale, m.zero_point = m.scale.clone(), m.zero_point.clone()

    def taps(self, x: Tensor, theta: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``(input of the last quantized layer, output)`` of the quantized model (FP under
        :func:`quantizers_off`), flattened per sample; ``theta`` replaces those weights."""
        self._tap.clear()
        out = functional_call(self.q, theta, (x,)) if theta is not None else self.q(x)
        feat = self._tap.pop()
        self._tap.clear()
        return feat.flatten(1), out.flatten(1)

    def per_sample_grads(self, x: Tensor) -> Tensor:
        """``(N, |theta|)``: ``d L_R(x_i) / d theta`` of every sample, vectorised with torch.func.

        ``L_R(x_i) = ||feat_FP - feat_Q||^2 + ||out_FP - out_Q||^2``; the FP targets keep their graph
        to ``x``, and so do the gradients (second-order path into ``x``).
        """
        with quantizers_off(self.q):
            feat_fp, out_fp = self.taps(x)

        def loss_one(theta: dict[str, Tensor], xi: Tensor, fi: Tensor, oi: Tensor) -> Tensor:
            feat, out = self.taps(xi.unsqueeze(0), theta)
            return (feat[0] - fi).pow(2).sum() + (out[0] - oi).pow(2).sum()

        grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(self.theta(), x, feat_fp, out_fp)
        return torch.cat([grads[n].flatten(1) for n in self.theta_names], 1)

    def neighbours(self, x: Tensor) -> Tensor:
        """``(K, B, ...)``: ``x + rho * N(0, I)``, K = ``n_neighbours`` (graph to ``x`` kept)."""
        k = self.cfg.n_neighbours
        eps = torch.randn((k, *x.shape), generator=self.generator, device=x.device, dtype=x.dtype)
        return x.unsqueeze(0) + self.cfg.rho * eps

    def __call__(self, x: Tensor, weight: float = 1.0) -> Tensor:
        """``weight * mean_{i,k} (1 - cos(g_i, g_i^k))`` for the images ``x``, differentiable into ``x``.

        The per-sample gradients and their second-order graph are built ``chunk`` samples (with their
        neighbours) at a time, and each chunk's gradient into its images is taken before the next is
        built, so the graph held at once is a chunk's, not the batch's (ResNet-32, batch 128: ~3 GB less).
        Every row is computed by the same operations as over the whole batch, the gradient each
        ``1 - cos`` receives is the one ``weight * mean`` gives it, and the returned tensor passes the
        gathered image gradient on unchanged, so values and gradients are those of the unchunked term
        (``torch.equal``, checked in tests/test_sadag.py). Pass the weight here rather than multiplying
        the result: a factor applied afterwards scales the gradient after it was rounded.
        The unweighted value is kept in :attr:`last_value`."""
        x = x.to(self.dtype).contiguous()
        every = self.cfg.q_calib_every
        if self.evaluations == 0 or (every and self.evaluations % every == 0):
            self.calibrate(x)
        self.evaluations += 1
        b, k = x.shape[0], self.cfg.n_neighbours
        xs = torch.cat([x.unsqueeze(0), self.neighbours(x)]).flatten(0, 1)
        # the gradient every (1 - cos) element receives from ``weight * mean``, as autograd computes it
        elems = torch.zeros((k, b), dtype=self.dtype, device=x.device, requires_grad=True)
        (seed,) = torch.autograd.grad(weight * elems.mean(), elems)
        need = xs.requires_grad and torch.is_grad_enabled()
        terms = torch.empty((k, b), dtype=self.dtype, device=x.device)
        grad_xs = torch.zeros_like(xs) if need else None
        n_chunks = -(-b // max(1, int(self.chunk)))  # near-equal chunks: none of a few samples
        for idx in torch.arange(b, device=x.device).tensor_split(n_chunks):
            rows = torch.cat([idx + j * b for j in range(k + 1)])
            with torch.enable_grad():
                xc = xs.detach()[rows].requires_grad_(True)
                g = self.per_sample_grads(xc)
                nc = idx.numel()
                anchor, nb = g[:nc], g[nc:].view(k, nc, -1)
                term = 1.0 - F.cosine_similarity(anchor.unsqueeze(0), nb, dim=-1)
                if need:
                    (grad_xs[rows],) = torch.autograd.grad(term, xc, grad_outputs=seed[:, idx])
            terms[:, idx] = term.detach()
        value = terms.mean()
        self.last_value = float(value)
        out = weight * value
        return _WithGrad.apply(xs, out, grad_xs) if need else out


class _WithGrad(torch.autograd.Function):
    """``value`` forward; backward: the precomputed ``grad`` for ``x`` (times the incoming gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return g * grad, None, None


@SYNTHESIZERS.register("sadag")
class Sadag(Genie):
    """SADAG: Genie-D + gradient matching between each sample's and its neighbours' L_R gradients."""

    name = "sadag"
    Config = SadagConfig
    resumable = False  # its gradient-matching term keeps state across iterations (ranges, noise stream)
    #: ``(iteration, 1 - cos)`` of every evaluation of the term in the last batch made (unweighted)
    gm_trace: list[tuple[int, float]]

    def extra_loss(self, model: nn.Module, generator: torch.Generator, *, batch_size: int,
                   image_shape: tuple[int, int, int]) -> Callable[[int, Tensor], Tensor] | None:
        cfg = self.config
        self.gm_trace = []
        if cfg.lambda_gm == 0:
            return None
        # the neighbour noise has its own stream, seeded once from the batch's generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        noise = torch.Generator(device=generator.device).manual_seed(seed)
        gm = GradientMatching(model, cfg, image_shape, noise)
        start = int(cfg.gm_start * cfg.iters)
        zero = torch.zeros((), device=generator.device)

        def term(it: int, x: Tensor) -> Tensor:
            if it < start or (it - start) % cfg.gm_every:
                return zero
            term = gm(x, cfg.lambda_gm)
            self.gm_trace.append((it, gm.last_value))
            return term

        return term
