"""Gradient accumulation: one optimiser step's batch in micro-batches, so that memory follows the micro-batch.

Each micro-batch runs forward and backward on its own, its mean loss weighted by its share of the batch,
so the gradients add up to those of the batch's mean loss. Under DistributedDataParallel every micro-batch
but the last runs inside `no_sync()`: gradients are averaged across processes once per step, not once per
micro-batch. Learning-rate schedules, weight averaging and step counts stay per optimiser step.

What "the same gradient" means: exactly the batch's (up to float rounding) when samples do not interact in
the forward pass and every random draw is the same (attack starts drawn in batch order, noise drawn for the
whole batch first). BatchNorm in training mode makes samples interact: each micro-batch normalises with its
own statistics and updates the running ones once, exactly as each process of a DDP run does with its share;
accumulating m micro-batches of b images on one GPU computes what m GPUs with b images each compute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

Stats = TypeVar("Stats")


def micro_batches(n: int, micro_batch: int | None) -> list[slice]:
    """ceil(n / micro_batch) contiguous slices of near-equal size (sizes differ by at most one) covering
    range(n); one slice when `micro_batch` is None or at least n."""
    count = 1 if micro_batch is None or n <= micro_batch else -(-n // micro_batch)
    sizes = [n // count + (i < n % count) for i in range(count)]
    starts = [sum(sizes[:i]) for i in range(count)]
    return [slice(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def deferred_sync(network: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """`no_sync` of the DistributedDataParallel inside `network` (under autocast or torch.compile wrappers),
    or a context that does nothing when there is none (a single process)."""
    ddp = next((m for m in network.modules() if isinstance(m, DistributedDataParallel)), None)
    return ddp.no_sync if ddp is not None else contextlib.nullcontext


def accumulate_gradients(n: int, micro_batch: int | None, loss_of: Callable[[slice], tuple[Tensor, Stats]],
                         backward: Callable[[Tensor], None], *,
                         no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                         ) -> list[tuple[slice, Stats]]:
    """Backward of a batch of `n` samples in micro-batches of at most `micro_batch` (`micro_batches`).

    `loss_of(part)` computes the mean loss of the samples in `part` (and any statistics to keep);
    `backward(loss)` backpropagates it (e.g. through a gradient scaler). A micro-batch's loss is scaled by
    its share of the batch; a single micro-batch's is left as it is. Returns (part, statistics) per
    micro-batch, in order. The caller zeroes gradients before and steps the optimiser after.
    """
    parts = micro_batches(n, micro_batch)
    results = []
    for index, part in enumerate(parts):
        with no_sync() if index < len(parts) - 1 else contextlib.nullcontext():
            loss, stats = loss_of(part)
            backward(loss if len(parts) == 1 else loss * ((part.stop - part.start) / n))
        results.append((part, stats))
    return results
