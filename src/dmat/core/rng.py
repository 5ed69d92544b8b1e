"""Random streams keyed by what they are for, so a run resumes exactly and does not depend on batching."""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator whose stream depends only on `key` (e.g. seed, rank, step), hashed through numpy's
    SeedSequence so that neighbouring keys give unrelated streams. It lives on `device`: torch refuses a CPU
    generator for draws made on CUDA tensors."""
    state = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)
