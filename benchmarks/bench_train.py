"""Classifier training speed: the TRADES step against the reference's, per precision and memory format; FLOPs vs peak.

- Precision table (issue 16): for wrn-16-1 and wrn-16-4 at batch 128, images/s of one full training
  step of the reference (`reference_trades.py`: DM-Improves-AT's step, float32 NCHW) and of DMAT's
  `train` step (`dmat.core.losses.trades_loss` through `dmat.stage_setup.training_network`, as the stage
  runs it) in every setting (fp32/bf16 × contiguous/channels-last), timed in interleaved rounds in
  one process; the baseline is the reference step. Also the setting `auto` picks on this machine
  (the stage's own probe) and its cost. On CUDA the same table runs on the GPU.

For wrn-16-1, wrn-16-4 and wrn-28-10 at batch 128 (wrn-28-10 at batch 16: images/s is per image):
images/s of a full TRADES training step, its FLOPs, and the achieved GFLOP/s as a fraction of the
measured float32 matmul peak (the baseline). FlopCounterMode cannot follow the attack's
autograd.grad, so the step's FLOPs are composed from counted parts: a forward F and a full backward
B (weights and inputs) per batch; the step is 1 clean-target forward + 10 attack iterations of a
forward and an input-only backward (≈ B/2) + 2 training forwards and their backward:
13·F + 7·B. Also the batch sampler's images/s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.measure import interleaved_seconds, machine, speed_table
from benchmarks.reference_trades import reference_trades_step
from dmat.config import BaseConfig
from dmat.core.classifiers import DATASET_STATS, build_classifier
from dmat.core.losses import trades_loss
from dmat.core.precision import Decision, Setting, candidates, network_passes
from dmat.data.sampler import MixedBatchSampler
from dmat.data.store import write_store
from dmat.distributed import World
from dmat.stage_setup import choose_setting, training_network

NETWORKS = {"wrn-16-1": 128, "wrn-16-4": 128, "wrn-28-10": 16}  # batch measured (images/s is per image)
PRECISION_NETWORKS = ("wrn-16-1", "wrn-16-4")
PRECISION_BATCH, PRECISION_ROUNDS = 128, 3


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


def classifier(name: str, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    mean, std = DATASET_STATS["cifar10"]
    return build_classifier(name, num_classes=10, mean=mean, std=std).train().to(device)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)


def trades_step(model, optimizer, x, y) -> None:
    loss, _ = trades_loss(model, x, y, steps=10)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_step(name: str, batch: int, repeats: int = 2) -> tuple[float, float]:
    """(seconds per step, FLOPs per step)."""
    model = classifier(name)
    optimizer = sgd(model)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as forward:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    flops = 13 * forward.get_total_flops() + 7 * backward.get_total_flops()
    trades_step(model, optimizer, x, y)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        trades_step(model, optimizer, x, y)
    return (time.perf_counter() - started) / repeats, flops


def dmat_step(name: str, setting: Setting, x: torch.Tensor, y: torch.Tensor, device: str):
    """One training step of the `train` stage in `setting`, on a fresh copy of the network."""
    model = classifier(name, device)
    optimizer = sgd(model)
    network, scaler = training_network(model, Decision(setting, "requested"), World(0, 1, device), compile=False)

    def step() -> None:
        loss, _ = trades_loss(network, x, y, steps=10)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def reference_step(name: str, x: torch.Tensor, y: torch.Tensor, device: str):
    model = classifier(name, device)
    optimizer = sgd(model)
    return lambda: reference_trades_step(model, optimizer, x, y)


def precision_table(device: str = "cuda" if torch.cuda.is_available() else "cpu") -> dict:
    """The reference step and DMAT's step in every setting, interleaved; and what `auto` picks here."""
    results: dict = {"machine": machine(), "device": device, "batch": PRECISION_BATCH, "baseline": "reference"}
    for name in PRECISION_NETWORKS:
        results[name] = precision_row(name, device)
    return results


def precision_row(name: str, device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(PRECISION_BATCH, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (PRECISION_BATCH,), generator=generator).to(device)
    runs = {"reference": reference_step(name, x, y, device)}
    runs.update({f"dmat {s.name}": dmat_step(name, s, x, y, device) for s in candidates(device)})
    table = speed_table(interleaved_seconds(runs, PRECISION_ROUNDS), PRECISION_BATCH, "reference")
    started = time.perf_counter()
    decision = choose_setting(BaseConfig(), World(0, 1, device),
                              lambda: network_passes(classifier(name, device), [x], device, backward=True))
    return {"images_per_s": table, "auto_choice": decision.setting.name,
            "auto_probe_s": round(time.perf_counter() - started, 1),
            "auto_speedup_vs_reference": table[f"dmat {decision.setting.name}"]["speedup"]}


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
    results["sampler_images_per_s"] = round(sampler_images_per_s())
    results["precision"] = precision_table()
    return results
