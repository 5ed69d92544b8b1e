"""torchrun support: one process per device, only rank 0 writes and logs.

A plain `dmat <stage>` is a world of one and needs no torchrun. Under
`torchrun --nproc_per_node=N`, processes join a process group (gloo on CPU, nccl on CUDA) and each
works on its share of every global batch; gradients are averaged by DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def world(device: str) -> Iterator[World]:
    """Join torchrun's process group when launched by torchrun; otherwise a world of one."""
    import torch
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World(0, 1, device)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield World(rank, size, device)
    finally:
        dist.destroy_process_group()


def barrier(w: World) -> None:
    if w.size > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(w: World, obj=None):
    """Rank 0's value of `obj` on every rank (e.g. an MLflow run id, a resume decision)."""
    if w.size == 1:
        return obj
    import torch.distributed as dist

    box = [obj if w.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(w: World, values):
    """Sum a float tensor across ranks in place (metrics computed on each rank's shard)."""
    if w.size > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
    return values


def all_gather_object(w: World, obj) -> list:
    """Every rank's value of `obj` (picklable; tensors are best moved to the CPU first), in rank order."""
    if w.size == 1:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * w.size
    dist.all_gather_object(gathered, obj)
    return gathered
