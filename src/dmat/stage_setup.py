"""Process-wide settings a stage applies before it starts: threads, device, seeds."""

from __future__ import annotations

import random

import numpy as np

from dmat.config import BaseConfig, ParamsError


def apply_base(base: BaseConfig) -> None:
    """Seed Python's and numpy's global generators (stages that use torch call `apply_torch`)."""
    random.seed(base.seed)
    np.random.seed(base.seed % 2**32)


def apply_torch(base: BaseConfig) -> str:
    """Seed torch, set its CPU thread count (0 keeps torch's default) and return the device to use."""
    import torch

    if base.threads:
        torch.set_num_threads(base.threads)
    torch.manual_seed(base.seed)
    return resolve_device(base.device)


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when available; asking for CUDA without it is an error, not a silent fallback."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("base.device = 'cuda' but no CUDA device is available: use 'auto' or 'cpu'")
    return device
