"""Synthesis sharded over ``torch.distributed`` ranks (``torchrun ... -m zsq synthesize ...``).

A synthetic set is a list of independent batches: batch ``k`` is made from its own generator,
seeded by ``batch_seed(seed, k)`` (:mod:`zsq.synth.base`), so it does not matter which process makes
it. With ``WORLD_SIZE`` ranks, rank ``r`` makes the batches ``k = r, r + W, r + 2W, ...`` and writes
their shards; the shards then travel to rank 0 over the process group (``gather_object``: this
works across machines without a shared filesystem; on one machine the files are already there and
are only checked) and rank 0 writes the set's metadata. With the same seed and the same number of
intra-op threads per process, the set equals the single-process one image for image.

Backend: ``gloo`` on CPU, ``nccl`` when the model is on CUDA. Rendezvous is torchrun's
(``--standalone`` on one machine; ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT --nnodes N``
across machines).

Synthesizers whose batches depend on each other cannot shard (a generator trained across batches,
as in GDFQ-style recipes, would see a different sequence of batches on each rank); they set
``Synthesizer.shardable = False`` and are refused with a clear error.

``torchrun ... -m zsq quantize ...`` shards the synthesis the same way, then trains data-parallel
when the quantizer is one of :data:`DATA_PARALLEL_QUANTIZERS` (the QAT engine, ``qat-kd``: each rank
takes its rows of every global batch, gradients are summed over the ranks before the optimizer step,
the EMA activation ranges see the global batch's min/max; :mod:`zsq.qat.engine` documents what
equals the one-process run); other quantizers are refused under more than one process. The helpers
at the end of this module are the engine's collectives.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import BadValueError

#: quantizers that split their work over torchrun's processes (the others run in one process only)
DATA_PARALLEL_QUANTIZERS = ("qat-kd",)

def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world()[1] > 1


@contextlib.contextmanager
def process_group(device: torch.device | None = None, timeout_s: float = 3600.0):
    """Initialise the default process group for this torchrun process (and tear it down)."""
    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":  # nccl's collectives (and *_object's tensors) use the current CUDA device: this rank's
        torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def synthesize_sharded(model: nn.Module, synth: str, *, budget: str = "default", seed: int = 0,
                       n_images: int | None = None, out_dir: str | Path | None = None, progress: bool = True,
                       overrides: dict[str, Any] | None = None):
    """:func:`zsq.synth.synthesize` with the batches split over the ranks (see module doc). Every
    rank returns the complete :class:`~zsq.data.shards.SyntheticSet`."""
    from .data.shards import SyntheticSet, read_shard_bytes, write_shard_bytes
    from .synth.base import get_synthesizer, synthesize

    rank, size = world()
    ov = dict(overrides or {})
    if n_images is not None:
        ov["n_images"] = int(n_images)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    from .hardware import on_device

    with on_device(device):  # precision="auto" resolves for the model's device
        synthesizer = get_synthesizer(synth, budget, ov)
    if not getattr(synthesizer, "shardable", True):
        raise BadValueError(f"synthesizer {synthesizer.name} cannot be sharded over processes "
                            "(its batches depend on each other); run it in one process")
    n_batches = synthesizer.config.n_batches
    with process_group(device):
        mine = list(range(rank, n_batches, size))
        part = synthesize(model, synthesizer, budget=budget, seed=seed, out_dir=out_dir,
                          progress=progress and rank == 0, batches=mine)
        # ship this rank's shards (file bytes + sidecar) to rank 0, which writes any it lacks
        payload = [read_shard_bytes(part.dir, s["index"]) for s in part.shards]
        gathered: list[Any] | None = [None] * size if rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        if rank == 0:
            for items in gathered or []:
                for item in items or []:
                    write_shard_bytes(part.dir, item)
            full = synthesize(model, synthesizer, budget=budget, seed=seed, out_dir=out_dir, progress=False)
            if not full.complete:
                raise RuntimeError("distributed synthesis finished with missing shards")
            d = [str(full.dir)]
        else:
            d = [None]
        dist.broadcast_object_list(d, src=0)
        dist.barrier()
    if rank == 0:
        return full
    return SyntheticSet.load(d[0]) if Path(d[0]).is_dir() else part


# -- helpers of the data-parallel QAT engine (zsq.qat.engine, ``ddp=True``) --------------------------
def share(n: int, rank: int, size: int) -> slice:
    """The rows of a batch of ``n`` that rank ``rank`` of ``size`` takes: contiguous, sizes differing
    by at most one (``torch.tensor_split``'s split)."""
    q, r = divmod(int(n), int(size))
    start = rank * q + min(rank, r)
    return slice(start, start + q + (1 if rank < r else 0))


def rank0_call(fn):
    """``fn()`` run on rank 0 only, its result (or the error it raised) broadcast to every rank: all
    ranks return the same object or raise the same error (no rank is left waiting)."""
    import pickle

    rank = dist.get_rank()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001
                e = RuntimeError(f"{type(e).__name__}: {e}")
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def broadcast_tensors(tensors, src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (same shapes on every rank)."""
    for t in tensors:
        if t.numel():
            dist.broadcast(t.data, src=src)


def broadcast_data(images: torch.Tensor, labels: torch.Tensor | None, device: torch.device | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rank 0's training images (float32) and labels (int64) on every rank, returned on the CPU (a
    rank on another machine may hold only its own shards of a synthetic set); ``device``: where the
    collective runs (the model's: CUDA under nccl)."""
    meta = [(tuple(images.shape), labels is not None)] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(meta, src=0)
    shape, has_labels = meta[0]

    def bcast(t: torch.Tensor | None, shp: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if dist.get_rank() != 0:  # a fresh tensor: the caller's is left alone
            t = torch.empty(shp, dtype=dtype)
        t = t.to(device=device, dtype=dtype).contiguous()
        dist.broadcast(t, src=0)
        return t.cpu()

    return bcast(images, shape, torch.float32), bcast(labels, shape[:1], torch.int64) if has_labels else None


def all_reduce_grads(params) -> None:
    """Sum the gradients of ``params`` over the ranks in one flat all-reduce (each rank's loss was
    already scaled by its share of the global batch, so the sum is the global batch's gradient).
    Parameters without a gradient are skipped (the same ones on every rank: one graph)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g))
        i += n


def global_min_max(x: torch.Tensor) -> torch.Tensor:
    """``[min, max]`` of ``x`` over every rank's tensor (exact: one MAX all-reduce of ``[-min, max]``)."""
    f = x.detach().float()
    t = torch.stack([-f.min(), f.max()])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return torch.stack([-t[0], t[1]])


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Elementwise sum over the ranks of a list of floats (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
