"""The synthesizer interface and the runner that turns a synthesizer into a cached synthetic set.

A synthesizer is a small class with a ``name``, a config dataclass (its hyperparameters; the
dataclass defaults are the paper's, ``PRESETS`` holds the ``smoke`` / ``default`` budget overrides)
and one method, :meth:`Synthesizer.make_batch`, that makes global batch ``k`` from a
``torch.Generator`` seeded for that batch alone. :func:`synthesize` runs it batch by batch, writes
each finished batch as a checksummed shard under ``ZSQ_CACHE/synthetic/<key>/`` and resumes /
reuses what is already there::

    model = zsq.models.zoo.load_model("cifar10_resnet20")
    data = synthesize(model, "zeroq", budget="default", seed=0)
    data.images.shape  # (256, 3, 32, 32)

Batch ``k``'s seed is derived from ``(seed, k)`` only (:func:`batch_seed`), so batch ``k`` is the
same tensor whether it is made alone (``batches=[k]``, e.g. by one ``torch.distributed`` rank) or
among others, given the same machine, thread count and library versions.

Several processes sharing ``ZSQ_CACHE`` (two runs, or ``torchrun`` ranks with disjoint batches) make
each batch once: batch ``k`` is made under a file lock of its own (``.shard_0000k.lock``, ``flock``
through the ``filelock`` library, released by the OS when its holder dies; removed once the set is
complete); a process that finds it held says so in one line, waits, and reuses the shard the holder
wrote (or makes the batch itself when the holder died without finishing it).

Synthesizers whose batches are long loops and that set ``resumable = True`` (genie, zeroq) also keep
a mid-batch checkpoint (``.partial_0000k.pt``: the loop's whole state, every
``ZSQ_SYNTH_CKPT_EVERY_S`` seconds, default 300, and on Ctrl-C, which lets the current iteration
finish first), so an interrupted run continues inside the batch it was making, to the same tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.shards import (
    META, SCHEMA_VERSION, SyntheticSet, combined_sha256, shard_name, sidecar_path, synthetic_root, write_meta,
    write_shard,
)
from ..config import to_bool, to_float, to_int
from ..errors import BadValueError, DataError, OutputExistsError
from ..hardware import Amp, on_device, resolve_precision
from ..paths import check_writable, write_json_atomic, writing
from ..record import model_info
from ..registry import Registry
from ..spec import BUDGETS, check_budget
from ..train import NestedBar, deferred_sigint, derive_seed, seeded_generator
from .cache import (  # noqa: F401 - the cache's I/O (BatchCheckpoint and the file names: importable from here too)
    BATCH_CKPT_FORMAT, CKPT_EVERY_S, BatchCheckpoint, _batch_indices, _batch_lock, _ckpt_every_s, _finished_shard,
    _read_json, lock_name, partial_name,
)

#: ``auto``: bf16 where the CPU computes it natively, else fp32 (:func:`zsq.hardware.resolve_precision`),
#: resolved when the config is made so the key and the record name what ran
PRECISIONS = ("auto", "fp32", "bf16")

#: ``step(iteration, total_iterations, loss)``: called by iterative synthesizers after each step.
StepCallback = Callable[[int, int, float], None]


# ---------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------
ABLATION = "zsq_ablation"


def ablation(default: Any) -> Any:
    """A config field for an ablation added to an existing synthesizer: at ``default`` it must leave
    the images unchanged (no extra random draw), and it is then left out of the cache key."""
    return dataclasses.field(default=default, metadata={ABLATION: True})


@dataclass
class SynthConfig:
    """Hyperparameters every synthesizer has. Subclasses add theirs (defaults = the paper's).

    ``PRESETS[budget]`` are the overrides that budget applies on top of the dataclass defaults.
    ``precision`` (``fp32``/``bf16``: bf16 autocast for the forward only; images, optimiser state and
    the loss reductions stay fp32) and ``channels_last`` are speed switches; they are part of the
    cache key since they change bits. Default ``auto`` (bf16 on a CPU with native bf16, fp32
    elsewhere, resolved here so the config holds what runs) + channels_last: measured on ResNet-20
    pixel optimisation (BNS loss, input gradients only, CPU time per iteration, 1 thread, AVX-512
    bf16) bf16 is 1.9x faster than fp32 at batch 256 and 1.5x at batch 32, with the same loss
    trajectory (ZeroQ 500 iterations: final BNS 5.7 vs 5.4 in fp32); emulated (AVX2) it is several
    times slower (:mod:`zsq.hardware`).
    """

    n_images: int = 256
    batch_size: int = 256
    precision: str = "auto"
    channels_last: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self):
        if int(self.n_images) < 1:
            raise BadValueError(f"n_images must be >= 1, got {self.n_images}")
        if int(self.batch_size) < 1:
            raise BadValueError(f"batch_size must be >= 1, got {self.batch_size}")
        # fp16 is not a choice: it is what ``auto`` resolves to on a CUDA device without bf16 (a resolved
        # config made again, e.g. by ``dataclasses.replace``, keeps it there)
        if self.precision not in PRECISIONS and not (self.precision == "fp16" and resolve_precision("auto") == "fp16"):
            raise BadValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        self.precision = resolve_precision(self.precision)

    @classmethod
    def for_budget(cls, budget: str = "default", **overrides: Any):
        """The config of ``budget`` with ``overrides`` (field name -> value) applied on top."""
        check_budget(budget)
        names = {f.name: f for f in fields(cls)}
        unknown = [k for k in overrides if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"choose from: {', '.join(names)}"
            raise BadValueError(f"{cls.__name__} has no setting '{k}': {hint}")
        base = cls()
        values = {**cls.PRESETS.get(budget, {}), **overrides}
        return dataclasses.replace(base, **{k: coerce_setting(getattr(base, k), v, k) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` less the settings added after sets were cached (``ablation()`` fields) while
        they hold their default, which reproduces the images made before they existed: cached sets
        keep their key."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.metadata.get(ABLATION) and getattr(self, f.name) == f.default)}

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_images / self.batch_size)


def coerce_setting(default: Any, value: Any, name: str) -> Any:
    """Turn a CLI string into the type of the setting's default (bool / int / float) with
    :mod:`zsq.config`'s converters; a string that does not parse is a :class:`BadValueError`. Other
    values pass unchanged. Used for ``--synth-set``."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    if isinstance(default, bool):
        return to_bool(value, name)
    if isinstance(default, int):
        return to_int(value, name)
    if isinstance(default, float):
        return to_float(value, name)
    return value


# ---------------------------------------------------------------------------------------------------
# the interface
# ---------------------------------------------------------------------------------------------------
class Synthesizer:
    """Base class: subclasses set ``name`` and ``Config`` and implement :meth:`make_batch`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[SynthConfig]] = SynthConfig
    #: batches are independent (each from its own seeded generator), so ranks can split them
    shardable: ClassVar[bool] = True
    #: ``make_batch`` takes ``checkpoint=`` (a :class:`BatchCheckpoint`): it saves and restores its loop's
    #: state, so an interrupted batch continues where it stopped (to the same tensors)
    resumable: ClassVar[bool] = False

    def __init__(self, config: SynthConfig | None = None):
        self.config = config if config is not None else self.Config.for_budget("default")

    @classmethod
    def from_budget(cls, budget: str = "default", **overrides: Any) -> Synthesizer:
        return cls(cls.Config.for_budget(budget, **overrides))

    def make_batch(
        self,
        model: nn.Module,
        batch_index: int,
        generator: torch.Generator,
        *,
        batch_size: int,
        image_shape: tuple[int, int, int],
        step: StepCallback | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """Make global batch ``batch_index``: images (B, C, H, W), float32, normalised input space.

        Every random draw must use ``generator`` (seeded for this batch only). May return a dict
        of tensors with an ``"images"`` entry (e.g. plus ``"labels"``). ``model`` arrives in eval
        mode with ``requires_grad=False`` parameters (and channels_last when configured).
        A ``resumable`` synthesizer also takes ``checkpoint: BatchCheckpoint | None``.
        """
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        """Called once by :func:`synthesize` before the first batch it makes (not when every batch is
        cached): load external resources (GenQ's diffusion pipeline) and raise the errors a user can
        cause before any progress bar or file. Default: nothing."""

    # helpers for subclasses ------------------------------------------------------------------------
    def amp(self, device: torch.device | str = "cpu") -> Amp:
        """The loop's mixed precision (:class:`zsq.hardware.Amp`): autocast for the forward pass, and for
        ``fp16`` (a CUDA device without bf16) the gradient scaler of ``amp.backward`` / ``amp.step``."""
        return Amp(self.config.precision, device)

    def autocast(self, device: torch.device | str = "cpu"):
        """Autocast for the forward pass: bf16 when ``config.precision == 'bf16'``, fp16 for ``fp16``."""
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        return self.amp(device).autocast()

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.config.channels_last else torch.contiguous_format

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


SYNTHESIZERS: Registry[type[Synthesizer]] = Registry("synthesizer")


def get_synthesizer(
    synth: str | Synthesizer | type[Synthesizer], budget: str = "default", overrides: dict[str, Any] | None = None,
) -> Synthesizer:
    """A synthesizer instance from a registered name, a class or an instance (+ budget / overrides)."""
    overrides = dict(overrides or {})
    if isinstance(synth, Synthesizer):
        if overrides:
            return type(synth)(dataclasses.replace(synth.config, **{
                k: coerce_setting(getattr(synth.config, k), v, k) for k, v in overrides.items()}))
        return synth
    cls = SYNTHESIZERS[synth] if isinstance(synth, str) else synth
    return cls.from_budget(budget, **overrides)


# ---------------------------------------------------------------------------------------------------
# seeds, model preparation, fingerprints
# ---------------------------------------------------------------------------------------------------
def batch_seed(seed: int, batch_index: int) -> int:
    """A 63-bit seed for global batch ``batch_index`` of run ``seed`` (independent of other batches)."""
    return derive_seed("zsq-synth", seed, batch_index)


def batch_generator(seed: int, batch_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    return seeded_generator(batch_seed(seed, batch_index), device)


@contextlib.contextmanager
def prepared(model: nn.Module, channels_last: bool = False) -> Iterator[nn.Module]:
    """Eval mode, frozen parameters (and channels_last) during synthesis; everything restored after."""
    was_training = {m: m.training for m in model.modules()}
    grad = [(p, p.requires_grad) for p in model.parameters()]
    # 4-D tensors that were in the default layout: (module, attribute kind, name)
    plain: list[tuple[nn.Module, str, str]] = []
    if channels_last:
        for mod in model.modules():
            for kind, store in (("p", mod._parameters), ("b", mod._buffers)):
                for name, t in store.items():
                    if t is not None and t.dim() == 4 and t.is_contiguous():
                        plain.append((mod, kind, name))
    model.eval()
    for p, _ in grad:
        p.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        for m, tr in was_training.items():
            m.training = tr
        for p, rg in grad:
            p.requires_grad_(rg)
        for mod, kind, name in plain:
            if kind == "p":
                p = mod._parameters[name]
                if p is not None and not p.is_contiguous():
                    p.data = p.data.contiguous()
            else:
                b = mod._buffers[name]
                if b is not None and not b.is_contiguous():
                    mod._buffers[name] = b.contiguous()


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """``{"id", "weights_sha256"}`` from the model's record (``model_info``); hashes the state_dict when unknown."""
    info = model_info(model)
    mid = getattr(info, "id", None) or f"module:{type(model).__name__}"
    sha = getattr(info, "weights_sha256", None) or state_dict_sha256(model)
    return {"id": mid, "weights_sha256": sha}


def state_dict_sha256(model: nn.Module) -> str:
    """``state_dict:<sha256>`` of every state tensor's name, dtype, shape and bytes (current weights)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "state_dict:" + h.hexdigest()


def _image_shape(model: nn.Module, image_size: int | None) -> tuple[int, int, int]:
    if image_size is None:
        info = model_info(model)
        image_size = getattr(getattr(info, "preprocess", None), "input_size", None)
        if image_size is None:
            raise BadValueError("the model carries no input size (load it with zsq's load_model, "
                                "or pass image_size=)")
    return (3, int(image_size), int(image_size))


def synthetic_key(fingerprint: dict[str, Any], synth: Synthesizer, budget: str, seed: int,
                  image_shape: tuple[int, int, int], device: torch.device | str = "cpu") -> str:
    """``<synth>-<hash>``: hash of model (id + weights), synthesizer + resolved config, budget, seed, n,
    and the device type when it is not ``cpu`` (a CUDA generator draws other bits; every CPU key is the
    one made before devices existed)."""
    payload = {
        "model": fingerprint, "synth": synth.name, "config": synth.config.key_dict(), "budget": budget,
        "seed": int(seed), "n_images": synth.config.n_images, "image_shape": list(image_shape),
    }
    device_type = torch.device(device).type
    if device_type != "cpu":
        payload["device"] = device_type
    h = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{synth.name}-{h[:24]}"


# ---------------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------------
def _make_shard(synthesizer: Synthesizer, model: nn.Module, k: int, seed: int, key: str, d: Path,
                shape: tuple[int, int, int], device: torch.device, bar: NestedBar, resumable: bool,
                every_s: float) -> tuple[dict[str, Any], bool]:
    """Make batch ``k`` (continuing its mid-batch checkpoint when the synthesizer is ``resumable``), write
    its shard and sidecar; returns ``(sidecar, interrupted)``: ``interrupted`` when a Ctrl-C came during
    the last iteration (the shard is complete; the caller stops after it)."""
    cfg = synthesizer.config
    n_k = min(cfg.batch_size, cfg.n_images - k * cfg.batch_size)
    rec: dict[str, float] = {}
    trace: list[list[float]] = []

    def step(it: int, total: int, loss: float) -> None:
        rec.setdefault("first", float(loss))
        rec["last"] = float(loss)
        if it % max(1, total // 100) == 0 or it == total - 1:  # <= ~100 points for `zsq report`
            trace.append([int(it), round(float(loss), 6)])
        bar.update(it + 1, loss, total)

    bar.start(f"  batch {k}")
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {}
    sigint = deferred_sigint(f"Ctrl-C: saving batch {k} at the end of this iteration (Ctrl-C again to stop at once)") \
        if resumable else contextlib.nullcontext({"hit": False})
    with sigint as flag:
        ck = None
        if resumable:
            ck = BatchCheckpoint(d / partial_name(k), f"{key}/{k}/{n_k}", every_s=every_s, interrupt=flag,
                                 rec=rec, trace=trace)
            kwargs["checkpoint"] = ck
        out = synthesizer.make_batch(model, k, batch_generator(seed, k, device), batch_size=n_k,
                                     image_shape=shape, step=step, **kwargs)
        interrupted = bool(flag["hit"])
    wall = ck.wall_s if ck is not None else time.perf_counter() - t0
    tensors = dict(out) if isinstance(out, dict) else {"images": out}
    imgs = tensors.get("images")
    if not isinstance(imgs, Tensor) or tuple(imgs.shape) != (n_k, *shape):
        got = tuple(imgs.shape) if isinstance(imgs, Tensor) else type(imgs).__name__
        raise RuntimeError(f"{synthesizer.name}.make_batch returned images {got}, expected {(n_k, *shape)}")
    tensors["images"] = imgs.detach().float()
    if not torch.isfinite(tensors["images"]).all():  # never a shard of NaN images that looks finished
        if ck is not None:
            ck.clear()
        raise BadValueError(f"{synthesizer.name} made non-finite images in batch {k} (last loss "
                            f"{rec.get('last')}): its synthesis diverged; lower its lr or loss weights")
    pt = d / shard_name(k)
    sha = write_shard(pt, tensors)
    side = {
        "index": k, "file": pt.name, "sha256": sha, "n": n_k, "wall_s": round(wall, 4),
        "loss_first": rec.get("first"), "loss_last": rec.get("last"),
        "batch_seed": batch_seed(seed, k), "key": key, "loss_trace": trace,
    }
    write_json_atomic(sidecar_path(pt), side)
    if ck is not None:
        ck.clear()
    return side, interrupted


def synthesize(
    model: nn.Module,
    synth: str | Synthesizer | type[Synthesizer] = "zeroq",
    budget: str = "default",
    seed: int = 0,
    n_images: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    *,
    batches: Iterable[int] | None = None,
    image_size: int | None = None,
    on_shard: Callable[[int, Path], None] | None = None,
) -> SyntheticSet:
    """Make (or reuse, or resume) the synthetic set of ``synth`` for ``model``.

    Args:
        model: the FP network (``load_model`` result); restored to its mode / grad flags after.
        synth: a registered synthesizer name, class or instance.
        budget: ``smoke`` | ``default`` | ``paper`` preset of the synthesizer's config.
        seed: run seed; batch ``k`` uses ``batch_seed(seed, k)``.
        n_images: overrides the budget's ``n_images``.
        out_dir: write here instead of ``ZSQ_CACHE/synthetic/<key>/`` (refused if it holds a set
            made with other settings).
        progress: show a rich progress bar (batches, and iterations with the running loss).
        overrides: config field -> value on top of the budget preset.
        batches: make only these global batch indices (one ``torch.distributed`` rank's share);
            the result is incomplete (``.complete`` False) until every shard exists.
        image_size: spatial size when the model's record gives none.
        on_shard: called as ``on_shard(index, path)`` after each newly written shard.

    Returns the :class:`~zsq.data.shards.SyntheticSet`. Finished shards (checksums verified) are
    never made again, so re-running the same call resumes an interrupted run and returns at once
    when the set is complete.
    """
    t_start = time.perf_counter()
    check_budget(budget)
    ov = dict(overrides or {})
    if n_images is not None:
        ov["n_images"] = int(n_images)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with on_device(device):  # precision="auto" resolves for the model's device
        synthesizer = get_synthesizer(synth, budget, ov)
    cfg = synthesizer.config
    shape = _image_shape(model, image_size)
    fp = model_fingerprint(model)
    key = synthetic_key(fp, synthesizer, budget, seed, shape, device)
    own_dir = out_dir is not None
    d = Path(out_dir) if own_dir else synthetic_root() / key
    n_batches = cfg.n_batches
    wanted = _batch_indices(batches, n_batches)

    meta = _read_json(d / META) if (d / META).is_file() else None
    if meta is not None:
        if meta.get("key") != key:
            raise OutputExistsError(f"{d} holds a synthetic set made with other settings; "
                                    "choose another output directory or delete it")
        try:
            return SyntheticSet.load(d)
        except DataError as e:
            # one warning per problem, and none that says to delete the set while it is being repaired: a
            # shard that fails its checksum is reported where it is made again (_finished_shard)
            if getattr(e, "shard", None) is None:
                warnings.warn(f"{getattr(e, 'problem', e)}; repairing the set", stacklevel=2)
            (d / META).unlink(missing_ok=True)

    done: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for k in wanted:
        side = _finished_shard(d, k, key, own_dir)
        if side is None:
            todo.append(k)
        else:
            done[k] = side
    if todo:
        synthesizer.prepare(model)  # external resources and their user errors, before anything is written
        # the shards must fit: a read-only, unwritable or too full directory is one line now, not after the work
        n_todo = sum(min(cfg.batch_size, cfg.n_images - k * cfg.batch_size) for k in todo)
        check_writable(d, need_bytes=n_todo * math.prod(shape) * 4)
    else:
        with writing(d, every=True):
            d.mkdir(parents=True, exist_ok=True)

    title = f"{synthesizer.name} ({budget}, seed {seed})"
    resumable = bool(getattr(synthesizer, "resumable", False))
    every_s = _ckpt_every_s() if resumable else 0.0
    with prepared(model, cfg.channels_last), NestedBar(progress, title, len(wanted)) as bar:
        bar.skip(len(wanted) - len(todo))
        noted: list[str] = []

        def note(msg: str) -> None:  # the first wait only: the bar then advances as the other process finishes
            if not noted:
                noted.append(msg)
                bar.note(msg)

        for k in todo:
            with _batch_lock(d, k, note):
                side = _finished_shard(d, k, key, own_dir)  # another process made it while this one waited
                if side is not None:
                    (d / partial_name(k)).unlink(missing_ok=True)
                    done[k] = side
                    bar.skip(1)
                    continue
                side, interrupted = _make_shard(synthesizer, model, k, seed, key, d, shape, device, bar,
                                                resumable, every_s)
                done[k] = side
            bar.end(side["loss_last"])
            if on_shard is not None:
                on_shard(k, d / shard_name(k))
            if interrupted:  # Ctrl-C during the batch's last iteration: its shard is written, stop here
                raise KeyboardInterrupt

    # other processes may have written the remaining shards
    all_sides: dict[int, dict[str, Any]] = dict(done)
    for k in range(n_batches):
        if k not in all_sides:
            side = _finished_shard(d, k, key, own_dir)
            if side is not None:
                all_sides[k] = side
    shards = [
        {kk: all_sides[k][kk] for kk in ("index", "file", "sha256", "n", "wall_s", "loss_first", "loss_last")}
        for k in sorted(all_sides)
    ]
    meta = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "model": fp,
        "synth": synthesizer.name,
        "config": cfg.to_dict(),
        "budget": budget,
        "seed": int(seed),
        "n_images": cfg.n_images,
        "batch_size": cfg.batch_size,
        "n_shards": n_batches,
        "image_shape": list(shape),
        "shards": shards,
    }
    if len(all_sides) < n_batches:
        mine = [s for s in shards if s["index"] in set(wanted)]
        return SyntheticSet(dir=d, meta=meta, shards=mine, complete=False)
    from .._version import __version__

    meta.update({
        "sha256": combined_sha256([s["sha256"] for s in shards]),
        "wall_s": round(sum(float(s["wall_s"]) for s in shards), 3),
        "this_call_s": round(time.perf_counter() - t_start, 3),
        "threads": torch.get_num_threads(),
        "versions": {"zsq": __version__, "torch": torch.__version__},
    })
    write_meta(d, meta)
    # the set is complete: its batch locks are no longer needed (a process still waiting on one finds the
    # shard made when it gets it), nor a mid-batch checkpoint left by an interrupt after its shard was written
    for p in [*d.glob(".shard_*.lock"), *d.glob(".partial_*.pt")]:
        with contextlib.suppress(OSError):
            p.unlink()
    return SyntheticSet(dir=d, meta=meta, shards=shards, complete=True)


__all__ = [
    "BUDGETS", "BatchCheckpoint", "PRECISIONS", "SYNTHESIZERS", "StepCallback", "SynthConfig", "Synthesizer",
    "SyntheticSet",
    "batch_generator", "batch_seed", "get_synthesizer", "model_fingerprint", "prepared", "synthesize",
    "synthetic_key",
]
