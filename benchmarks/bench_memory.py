"""Activation memory per image of the paper-scale training steps (measured on the CPU); the per-GPU estimate.

What a training step keeps for its backward pass grows with the images in one forward: the micro-batch. It
is measured without a GPU, with `torch.autograd.graph.saved_tensors_hooks`: every tensor autograd saves is
counted (once per storage, parameters excluded) while it is alive, and the peak over the whole step (loss,
attack, backward) is kept. Two batch sizes give the bytes per image (the slope), so batch-independent parts
drop out. In float32; bf16 autocast saves most activations in half the bytes, so float32 bounds it.

- `ddpmpp-cifar` (EDM's DDPM++, ~56M parameters) with the adversarial diffusion loss on every image
  (`train_diffusion`, mode adversarial, fraction 1): the clean graph and the perturbed graph are alive together.
- `wrn-28-10` TRADES-10 (`train`): the clean and the adversarial training graphs (the attack's graphs are freed
  step by step); and standard cross-entropy training (`train_reference`): one graph.

The per-GPU estimate for a micro-batch of m images is m · (bytes per image) + the training state (weights,
gradients, optimiser moments, weight average: 4 + 4 + 4·k + 4 bytes per parameter), plus 25% for what this does
not count (the allocator's rounding and caching, cuDNN workspaces, transient buffers inside an operation).
`benchmarks/gpu_check.py` measures the real peak on a GPU per micro-batch; `benchmarks/results/memory.json`
holds this benchmark's output that the README quotes and a test checks the paper profile against.
"""

from __future__ import annotations

import json
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.measure import machine
from dmat.config import Params
from dmat.core.classifiers import DATASET_STATS, build_classifier
from dmat.core.denoisers import build_denoiser
from dmat.core.diffusion_at import DiffusionATConfig, diffusion_training_loss
from dmat.core.losses import trades_loss
from dmat.profiles import load_profile

RESULTS = Path(__file__).parent / "results" / "memory.json"
ROOT = Path(__file__).parents[1]
PAPER_PROFILE = "profiles/paper-cifar10.yaml"  # relative to ROOT
GPU_MEMORY_GB = 80  # an A100 or H100 80 GB (the H100 of a cloud offers about 79.6 GB to programs)
OVERHEAD = 1.25  # allocator rounding and caching, cuDNN workspaces, transient buffers: not counted by the hooks
BATCHES = (2, 4)


class SavedTensorMeter:
    """Peak bytes of the tensors autograd keeps for backward, each storage counted once, `exclude`d ones (the
    parameters) not at all. Use as a context around the forward and backward passes to measure."""

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, references]
        self.current = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0:
            return tensor
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        handle = _Saved(tensor)
        weakref.finalize(handle, self._release, key)
        return handle

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


class _Saved:
    """What autograd keeps instead of the tensor while the meter counts it (freed with the graph)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def peak_saved_bytes(model: nn.Module, step: Callable[[int], torch.Tensor], batch: int) -> int:
    """Peak saved-activation bytes of `step(batch)` (a loss) and its backward."""
    with SavedTensorMeter(model.parameters()) as meter:
        step(batch).backward()
    model.zero_grad(set_to_none=True)
    return meter.peak


def per_image_bytes(model: nn.Module, step: Callable[[int], torch.Tensor]) -> float:
    small, large = (peak_saved_bytes(model, step, batch) for batch in BATCHES)
    return (large - small) / (BATCHES[1] - BATCHES[0])


def diffusion_step(model: nn.Module) -> Callable[[int], torch.Tensor]:
    cfg = DiffusionATConfig(mode="adversarial", fraction=1.0)

    def step(n: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(n)
        x0 = torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1
        loss, _ = diffusion_training_loss(model, x0, torch.arange(n) % 10, cfg, generator=generator)
        return loss.mean()

    return step


def trades_step(model: nn.Module, attack_steps: int = 2) -> Callable[[int], torch.Tensor]:
    """TRADES with a short attack: its graphs are freed step by step, the peak is the two training graphs."""
    def step(n: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(n)
        x = torch.rand(n, 3, 32, 32, generator=generator)
        return trades_loss(model, x, torch.arange(n) % 10, steps=attack_steps, generator=generator)[0]

    return step


def standard_step(model: nn.Module) -> Callable[[int], torch.Tensor]:
    def step(n: int) -> torch.Tensor:
        x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        return F.cross_entropy(model(x), torch.arange(n) % 10)

    return step


def measure() -> dict:
    """Per training step of the paper profile: float32 saved-activation MB per image and the parameter count."""
    torch.manual_seed(0)
    denoiser = build_denoiser("ddpmpp-cifar", img_resolution=32, in_channels=3, num_classes=10).train()
    mean, std = DATASET_STATS["cifar10"]
    wide = build_classifier("wrn-28-10", num_classes=10, mean=mean, std=std).train()
    mb = 2**20
    return {
        "train_diffusion": {"model": "ddpmpp-cifar", "parameters": _count(denoiser), "optimizer_moments": 2,
                            "mb_per_image": per_image_bytes(denoiser, diffusion_step(denoiser)) / mb},
        "train": {"model": "wrn-28-10", "parameters": _count(wide), "optimizer_moments": 1,
                  "mb_per_image": per_image_bytes(wide, trades_step(wide)) / mb},
        "train_reference": {"model": "wrn-28-10", "parameters": _count(wide), "optimizer_moments": 1, "ema": False,
                            "mb_per_image": per_image_bytes(wide, standard_step(wide)) / mb},
    }


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def estimate_gb(measured: dict, micro_batch: int) -> float:
    """Per-GPU peak estimate in GB (10^9 bytes) for one stage's measurement at a micro-batch of `micro_batch`."""
    copies = 2 + measured["optimizer_moments"] + (1 if measured.get("ema", True) else 0)
    state = measured["parameters"] * 4 * copies
    return OVERHEAD * (micro_batch * measured["mb_per_image"] * 2**20 + state) / 1e9


def images_per_forward(params: Params, stage: str, processes: int) -> int:
    """The most images one forward of `stage` holds with `processes` GPUs: the share, at most the micro-batch."""
    section = params.section(stage)
    share = math.ceil(section.batch_size / processes)
    return share if section.micro_batch is None else min(share, section.micro_batch)


def paper_params() -> Params:
    """The params the paper profile makes (defaults + its changes)."""
    return load_profile(PAPER_PROFILE, ROOT)[0]


def paper_estimates(measured: dict, params: Params, processes: Iterable[int] = (1, 8)) -> dict:
    """Per stage and GPU count: the images per forward and the per-GPU estimate in GB."""
    return {stage: {f"{n}_gpus": {"images_per_forward": images_per_forward(params, stage, n),
                                  "estimate_gb": round(estimate_gb(entry, images_per_forward(params, stage, n)), 1)}
                    for n in processes}
            for stage, entry in measured.items()}


def run() -> dict:
    started = time.perf_counter()
    measured = {stage: {**entry, "mb_per_image": round(entry["mb_per_image"], 2)} for stage, entry in measure().items()}
    return {"measured": measured, "paper_profile": paper_estimates(measured, paper_params()),
            "gpu_memory_gb": GPU_MEMORY_GB, "overhead": OVERHEAD, "batches": list(BATCHES),
            "seconds": round(time.perf_counter() - started), "machine": machine()}


if __name__ == "__main__":  # python -m benchmarks.bench_memory [--save]: --save rewrites benchmarks/results/memory.json
    result = run()
    if "--save" in sys.argv[1:]:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
