"""The real/synthetic batch sampler (docs/method.md): the method's central knob.

Every batch holds exactly round(f·B) generated images, drawn with replacement from the chosen
generated images, and B − round(f·B) real images, drawn without replacement within an epoch. An
epoch is ceil(N_real / B) steps however large the generated set is, so "epochs" is a step budget
(as in the reference implementation). f = 0 trains on real data only, f = 1 on generated only.

Indices are a pure function of (seed, epoch, step): a run resumed mid-epoch sees the same batches,
and under DDP each rank takes its own slice of the same global batch. Images are gathered straight
from the stores with `ArrayStore.read`, so memory does not grow with the size of the generated store.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    """Store row indices of one (global or per-rank) batch."""

    real: np.ndarray
    synthetic: np.ndarray

    def __len__(self) -> int:
        return len(self.real) + len(self.synthetic)


class MixedBatchSampler:
    def __init__(self, n_real: int, synthetic_rows: np.ndarray, *, batch_size: int, fraction: float, seed: int):
        """`synthetic_rows`: the generated-store rows this run may use (the mix stage's draw)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"the synthetic fraction must lie in [0, 1], got {fraction}")
        self.synthetic_per_batch = round(fraction * batch_size)
        self.real_per_batch = batch_size - self.synthetic_per_batch
        if self.synthetic_per_batch and len(synthetic_rows) == 0:
            raise ValueError(f"fraction {fraction} needs generated images, but none were given")
        if self.real_per_batch and n_real == 0:
            raise ValueError("the real training store is empty")
        self.n_real = n_real
        self.synthetic_rows = np.asarray(synthetic_rows, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = max(1, math.ceil(n_real / batch_size))

    def _rng(self, purpose: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, purpose, epoch]))

    def epoch(self, epoch: int, *, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[BatchPlan]:
        """The batches of one epoch from `start_step` on, each cut to this rank's share."""
        real_order = self._rng(0, epoch).permutation(self.n_real)
        synthetic_rng = self._rng(1, epoch)
        synthetic = self.synthetic_rows[synthetic_rng.integers(0, max(len(self.synthetic_rows), 1),
                                                               size=(self.steps_per_epoch, self.synthetic_per_batch))] \
            if self.synthetic_per_batch else np.empty((self.steps_per_epoch, 0), dtype=np.int64)
        for step in range(start_step, self.steps_per_epoch):
            real = real_order[step * self.real_per_batch:(step + 1) * self.real_per_batch]
            yield BatchPlan(np.array_split(real, world_size)[rank], np.array_split(synthetic[step], world_size)[rank])
