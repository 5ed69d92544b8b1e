"""Store rows (uint8 N×H×W×C) as the tensors models take.

Classifiers take float32 NCHW in [0, 1] (normalisation lives inside the model, docs/method.md); the
EDM denoiser works in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from dmat.data.store import ArrayStore


def to_device(array: np.ndarray, device: str) -> torch.Tensor:
    """A host array as a tensor on `device`. To a GPU through page-locked memory without waiting: a copy from
    ordinary memory would make the host wait until the GPU has finished all the work queued before it."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_unit_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 N×H×W×C → float32 N×C×H×W in [0, 1] (the classifiers' input contract), converted on `device`."""
    return to_device(images, device).permute(0, 3, 1, 2).float().div_(255).contiguous()


def to_model_space(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 N×H×W×C → float32 N×C×H×W in [−1, 1] (EDM's data space), converted on `device`."""
    return to_device(images, device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1).contiguous()


def first_points(store: ArrayStore, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of a store (all when None) as float NCHW in [0, 1] on the CPU, and their labels.

    Evaluations use a prefix (RobustBench's rule): stores are written in a seeded shuffled order."""
    count = len(store) if n is None else min(n, len(store))
    images, labels = store.read(np.arange(count))
    return to_unit_tensor(images, "cpu"), torch.from_numpy(labels.astype(np.int64))
