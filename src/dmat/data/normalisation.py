"""The input normalisation a classifier trained on a store carries inside it (docs/method.md)."""

from __future__ import annotations

import numpy as np

from dmat.core.classifiers import DATASET_STATS
from dmat.data.store import ArrayStore


def normalisation(store: ArrayStore) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) for a training store: the dataset's published constants when known (as the
    reference), else the store's own statistics, streamed (the store may not fit in memory)."""
    name = store.meta.source.get("dataset", "")
    if name in DATASET_STATS:
        mean, std = DATASET_STATS[name]
        return list(mean), list(std)
    channel_sum = np.zeros(store.image_shape[-1])
    channel_sq_sum = np.zeros(store.image_shape[-1])
    for start in range(0, len(store), 4096):
        chunk = np.asarray(store.images[start:start + 4096], dtype=np.float64) / 255
        channel_sum += chunk.sum(axis=(0, 1, 2))
        channel_sq_sum += (chunk**2).sum(axis=(0, 1, 2))
    count = len(store) * store.image_shape[0] * store.image_shape[1]
    mean = channel_sum / count
    return mean.tolist(), np.sqrt(np.maximum(channel_sq_sum / count - mean**2, 1e-12)).tolist()
