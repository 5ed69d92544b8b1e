"""torchrun support: one process per device, only rank 0 writes and logs.

A plain `dmat <stage>` is a world of one and needs no torchrun. With `base.nproc` above 1 (or 0: one
process per visible GPU) a stage that runs under torchrun starts torchrun itself (`relaunch_under_torchrun`);
`torchrun --nproc_per_node=N dmat <stage>` by hand does the same. Launched so, processes join one
process group and each works on its share of every global batch; gradients are averaged by
DistributedDataParallel.

On CUDA the group has two backends, `cpu:gloo,cuda:nccl`: NCCL moves tensors between GPUs, gloo carries
pickled objects and barriers. The tensor collectives below insist on tensors on the world's own device
(NCCL refuses CPU tensors, and would do so only at the first collective, after an epoch of work).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

from dmat.config import BaseConfig, ParamsError


@dataclass(frozen=True)
class World:
    """This process's place among the stage's processes. `joined`: a process group exists (every process
    launched by torchrun, even one alone); collectives are no-ops otherwise."""

    rank: int
    size: int
    device: str
    joined: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def world(device: str) -> Iterator[World]:
    """Join torchrun's process group when launched by torchrun; otherwise a world of one."""
    import torch
    import torch.distributed as dist

    if not launched_by_torchrun():
        yield World(0, 1, device)
        return
    rank, size, local_rank = (int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
    try:
        yield World(rank, size, device, joined=True)
    finally:
        dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def barrier(w: World) -> None:
    if w.joined:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(w: World, obj=None):
    """Rank 0's value of `obj` on every rank (e.g. an MLflow run id, a resume decision)."""
    if not w.joined:
        return obj
    import torch.distributed as dist

    box = [obj if w.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(w: World, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor on the world's device across ranks in place (metrics computed on each rank's shard)."""
    _check_device(w, values)
    if w.joined:
        import torch.distributed as dist

        dist.all_reduce(values)
    return values


def all_gather_rows(w: World, rows: torch.Tensor) -> torch.Tensor:
    """Every rank's `rows` (on the world's device) concatenated in rank order. Ranks may hold different
    numbers of rows (a global batch of 512 on 3 processes is 171 + 171 + 170): each pads to the longest."""
    _check_device(w, rows)
    if not w.joined:
        return rows
    import torch
    import torch.distributed as dist

    counts = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(w.size)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
    counts = [int(count) for count in torch.cat(counts).tolist()]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[:len(rows)] = rows
    gathered = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:count] for part, count in zip(gathered, counts, strict=True)])


def broadcast_buffers(w: World, module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) in `module` on every rank. Each rank's training forwards
    update its own copy; scoring on every rank needs the same model."""
    if not w.joined:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        _check_device(w, buffer)
        dist.broadcast(buffer, src=0)


def all_gather_object(w: World, obj) -> list:
    """Every rank's value of `obj` (picklable; tensors are best moved to the CPU first), in rank order."""
    if not w.joined:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * w.size
    dist.all_gather_object(gathered, obj)
    return gathered


def _check_device(w: World, tensor: torch.Tensor) -> None:
    """A collective's tensor must live where the world's backend serves (`cuda` matches any CUDA index)."""
    import torch

    have, want = tensor.device, torch.device(w.device)
    if have.type != want.type or (want.index is not None and have.index not in (None, want.index)):
        raise ValueError(f"a collective got a tensor on {have}, but this world's processes communicate on "
                         f"{w.device}: move it there first")


# --- launching ---------------------------------------------------------------------------------------------


def processes(base: BaseConfig) -> int:
    """How many processes `base.nproc` asks for: itself, or with 0 one per visible CUDA device (1 without)."""
    if base.nproc == 1 or (base.nproc == 0 and base.device == "cpu"):
        return 1
    import torch

    gpus = torch.cuda.device_count() if base.device != "cpu" else 0
    if base.nproc == 0:
        return max(gpus, 1)
    if gpus and base.nproc > gpus:
        raise ParamsError(f"base.nproc = {base.nproc} is not allowed here: only {gpus} CUDA devices are visible "
                          "(one process per device; 0 = one per visible device)")
    return base.nproc


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """`dmat ARGV` as torchrun would start it on this machine with `nproc` processes (this interpreter)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "dmat.cli", *argv]


def relaunch_under_torchrun(base: BaseConfig, argv: Iterable[str]) -> None:
    """Replace this process by torchrun running the same command in `processes(base)` processes, when that is
    more than one and torchrun did not start this process; otherwise return at once (no cost at nproc 1).

    `exec` keeps the process id, so DVC, a terminal's Ctrl-C and exit codes see torchrun as they saw `dmat`."""
    if launched_by_torchrun():
        return
    nproc = processes(base)
    if nproc > 1:
        command = torchrun_command(nproc, list(argv))
        print(f"dmat: base.nproc = {base.nproc}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os.execv(command[0], command)
