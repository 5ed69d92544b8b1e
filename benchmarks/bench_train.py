"""Classifier training speed: one TRADES step (10 attack steps) per network, against this CPU's matmul peak.

For wrn-16-1, wrn-16-4 and wrn-28-10 at batch 128 (wrn-28-10 at batch 16: images/s is per image):
images/s of a full TRADES training step, its FLOPs, and the achieved GFLOP/s as a fraction of the
measured float32 matmul peak (the baseline). FlopCounterMode cannot follow the attack's
autograd.grad, so the step's FLOPs are composed from counted parts: a forward F and a full backward
B (weights and inputs) per batch; the step is 1 clean-target forward + 10 attack iterations of a
forward and an input-only backward (≈ B/2) + 2 training forwards and their backward:
13·F + 7·B. Also bf16 autocast vs fp32 step speed, and the batch sampler's images/s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dmat.core.classifiers import DATASET_STATS, build_classifier
from dmat.core.losses import trades_loss
from dmat.data.sampler import MixedBatchSampler
from dmat.data.store import write_store

NETWORKS = {"wrn-16-1": 128, "wrn-16-4": 128, "wrn-28-10": 16}  # batch measured (images/s is per image)


def matmul_peak_gflops(size: int = 4096, repeats: int = 5, trials: int = 3) -> float:
    """Best of a few timed float32 matmul loops: the machine is shared, so the best is closest to the peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def trades_step(model, optimizer, x, y, autocast: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = trades_loss(model, x, y, steps=10)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_step(name: str, batch: int, autocast: bool = False, repeats: int = 2) -> tuple[float, float]:
    """(seconds per step, FLOPs per step)."""
    mean, std = DATASET_STATS["cifar10"]
    model = build_classifier(name, num_classes=10, mean=mean, std=std).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as forward:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    flops = 13 * forward.get_total_flops() + 7 * backward.get_total_flops()
    trades_step(model, optimizer, x, y, autocast)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        trades_step(model, optimizer, x, y, autocast)
    return (time.perf_counter() - started) / repeats, flops


def sampler_images_per_s() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        real = write_store(Path(tmp) / "r", rng.integers(0, 256, (20000, 32, 32, 3), dtype=np.uint8),
                           np.arange(20000) % 10, [str(i) for i in range(10)], {})
        syn = write_store(Path(tmp) / "s", rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
                          np.arange(50000) % 10, [str(i) for i in range(10)], {})
        sampler = MixedBatchSampler(len(real), np.arange(len(syn)), batch_size=512, fraction=0.7, seed=0)
        started, images = time.perf_counter(), 0
        for plan in sampler.epoch(0):
            real.read(plan.real), syn.read(plan.synthetic)
            images += len(plan)
        return images / (time.perf_counter() - started)


def run() -> dict:
    peak = matmul_peak_gflops()
    results: dict = {"matmul_peak_gflops": round(peak, 1), "threads": torch.get_num_threads()}
    for name, batch in NETWORKS.items():
        seconds, flops = time_step(name, batch)
        gflops = flops / seconds / 1e9
        results[name] = {"batch": batch, "images_per_s": round(batch / seconds, 2),
                         "gflop_per_image_step": round(flops / batch / 1e9, 2), "gflops": round(gflops, 1),
                         "fraction_of_matmul_peak": round(gflops / peak, 3)}
    fp32, _ = time_step("wrn-16-4", 64)
    bf16, _ = time_step("wrn-16-4", 64, autocast=True)
    results["wrn-16-4_bf16_over_fp32_step_time"] = round(bf16 / fp32, 2)
    results["sampler_images_per_s"] = round(sampler_images_per_s())
    return results
