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
    synthesizer = get_synthesizer(synth, budget, ov)
    if not getattr(synthesizer, "shardable", True):
        raise BadValueError(f"synthesizer {synthesizer.name} cannot be sharded over processes "
                            "(its batches depend on each other); run it in one process")
    n_batches = synthesizer.config.n_batches
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
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
