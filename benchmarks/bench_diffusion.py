"""Diffusion speed and memory: training images/s per AT mode (vs `none`), sampling images/s, generate's peak RSS.

- Training: the same network (unet-tiny, 32×32) and batch (32) for each adversarial mode, and for
  `adversarial` with the regulariser on a quarter of each batch (`adversarial.fraction`, the CPU
  default); the baseline is mode `none`, measured in the same run. Also unet-tiny's plain resampling
  against DDPM++'s resampling residual blocks (mode `none`).
- Sampling: images/s of the 18-step Heun sampler (35 network evaluations per image) for unet-tiny
  and the paper-scale ddpmpp-cifar, at the network batch the CPU default uses (16; 2 for ddpmpp).
- Memory: peak RSS of the real `dmat generate` stage for 1,000 vs 100,000 images (a 1-step Euler
  sampler on a tiny 8×8 model, so the store size dominates; one process); the ratio must stay near 1.
- Parallel generation: wall time of the real `dmat generate` (unet-tiny, 32×32, 200 images, 6 Heun
  steps) with `generate.workers` 1 vs one per core, measured in one run.
- Precision (issue 16): per setting (fp32/bf16 × contiguous/channels-last), images/s of the CPU
  default's diffusion training step (unet-tiny, batch 32, adversarial mode at fraction 0.25, through
  `dmat.stage_setup.training_network` as the stage runs it) and of Heun sampling as `generate` runs it
  (network batch 16, 10 steps, one thread per process); interleaved rounds, baseline fp32
  contiguous; and the setting `auto` picks for each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.measure import interleaved_seconds, machine, speed_table
from dmat.config import BaseConfig
from dmat.core.denoisers import DENOISERS, UNet, build_denoiser
from dmat.core.diffusion_at import DiffusionATConfig, diffusion_training_loss
from dmat.core.edm import Precond
from dmat.core.precision import Autocast, Decision, Setting, candidates, network_passes, to_memory_format
from dmat.core.samplers import edm_sigma_steps, heun_sampler
from dmat.distributed import World
from dmat.stage_setup import choose_setting, training_network
from dmat.stages.generate import FixedBatchDenoiser, available_cores

TRAINING_CASES = {name: DiffusionATConfig(mode=name) for name in ("none", "random", "adversarial", "invariance")}
TRAINING_CASES["adversarial, fraction 0.25"] = DiffusionATConfig(mode="adversarial", fraction=0.25)


def training_images_per_s(cfg: DiffusionATConfig, resample_blocks: bool = False, steps: int = 6,
                          batch: int = 32) -> float:
    torch.manual_seed(0)
    architecture = {**DENOISERS["unet-tiny"].kwargs, "resample_blocks": resample_blocks}
    model = Precond(UNet(img_resolution=32, in_channels=3, num_classes=10, **architecture))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x0, labels = torch.rand(batch, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (batch,))

    def step() -> None:
        loss, _ = diffusion_training_loss(model, x0, labels, cfg)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def sampling_images_per_s(name: str, batch: int) -> float:
    model = build_denoiser(name, img_resolution=32, in_channels=3, num_classes=10).eval()
    noise, labels = torch.randn(batch, 3, 32, 32), torch.arange(batch) % 10
    started = time.perf_counter()
    heun_sampler(model, noise, labels, edm_sigma_steps(18))
    return batch / (time.perf_counter() - started)


PRECISION_ROUNDS = 3
CPU_DEFAULT_AT = DiffusionATConfig(mode="adversarial", fraction=0.25)
TRAIN_BATCH, NETWORK_BATCH, SAMPLER_STEPS = 32, 16, 10


def unet_tiny(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_denoiser("unet-tiny", img_resolution=32, in_channels=3, num_classes=10).to(device)


def training_step(setting: Setting, device: str):
    """One optimiser step of `train_diffusion` (CPU default) in `setting`, on a fresh network."""
    model = unet_tiny(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    network, scaler = training_network(model, Decision(setting, "requested"), World(0, 1, device), compile=False)
    generator = torch.Generator().manual_seed(0)
    x0 = (torch.rand(TRAIN_BATCH, 3, 32, 32, generator=generator) * 2 - 1).to(device)
    labels = torch.randint(0, 10, (TRAIN_BATCH,), generator=generator).to(device)

    def step() -> None:
        loss, _ = diffusion_training_loss(network, x0, labels, CPU_DEFAULT_AT,
                                          generator=torch.Generator(device).manual_seed(1))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss.mean()).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def sampling_run(setting: Setting, device: str):
    """Heun sampling of one network batch as `generate` runs it in `setting` (fixed-size chunks, eval mode)."""
    model = unet_tiny(device).eval()
    network = FixedBatchDenoiser(Autocast(to_memory_format(model, setting), setting, device), NETWORK_BATCH)
    noise = torch.randn(NETWORK_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    labels = (torch.arange(NETWORK_BATCH) % 10).to(device)
    return lambda: heun_sampler(network, noise, labels, edm_sigma_steps(SAMPLER_STEPS))


def precision_table(device: str = "cuda" if torch.cuda.is_available() else "cpu") -> dict:
    """Training step and sampling images/s per setting (interleaved rounds), and what `auto` picks for each."""
    settings = candidates(device)
    train_runs = {s.name: training_step(s, device) for s in settings}
    training = speed_table(interleaved_seconds(train_runs, PRECISION_ROUNDS), TRAIN_BATCH, settings[0].name)
    x = (torch.rand(TRAIN_BATCH, 3, 32, 32) * 2 - 1).to(device)
    sigma, labels = torch.ones(TRAIN_BATCH, device=device), torch.zeros(TRAIN_BATCH, dtype=torch.int64, device=device)
    train_auto = choose_setting(BaseConfig(), World(0, 1, device),
                                lambda: network_passes(unet_tiny(device), [x, sigma, labels], device, backward=True))
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # as each of generate's worker processes
    try:
        sample_runs = {s.name: sampling_run(s, device) for s in settings}
        sampling = speed_table(interleaved_seconds(sample_runs, PRECISION_ROUNDS), NETWORK_BATCH, settings[0].name)
        n = NETWORK_BATCH
        sample_auto = choose_setting(BaseConfig(), World(0, 1, device), lambda: network_passes(
            unet_tiny(device).eval(), [x[:n], sigma[:n], labels[:n]], device, backward=False))
    finally:
        torch.set_num_threads(threads)
    return {"machine": machine(), "device": device, "baseline": settings[0].name,
            "train_step_images_per_s": training, "train_auto_choice": train_auto.setting.name,
            "sampling_images_per_s": sampling, "sampling_threads": 1 if device == "cpu" else threads,
            "sampling_auto_choice": sample_auto.setting.name}


PEAK_RSS = """
import resource, runpy, sys
sys.argv = ["dmat", "generate"]
try:
    runpy.run_module("dmat.cli", run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _tiny_project(work: Path, size: int) -> dict[str, str]:
    """An image folder of 10 classes × 2 images of size×size in `work`; the env for its stages."""
    from PIL import Image

    for split in ("train", "test"):
        for c in range(10):
            (work / "folder" / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((size, size, 3), 20 * c, np.uint8)).save(work / "folder" / split / f"c{c}" /
                                                                                  f"{i}.png")
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}


def _stage(work: Path, env: dict[str, str], *stages: str) -> None:
    for stage in stages:
        subprocess.run([sys.executable, "-m", "dmat.cli", stage], cwd=work, env=env, check=True, capture_output=True)


def generate_peak_rss_mb(per_class_counts: tuple[int, ...] = (100, 10000)) -> dict[int, float]:
    """Peak RSS (MB) of `dmat generate` in a fresh process for each total image count."""
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = _tiny_project(work, 8)
        for per_class in per_class_counts:
            (work / "params.yaml").write_text(
                f"data: {{name: bench, path: {work / 'folder'}, val_size: 0}}\n"
                "train_diffusion: {steps: 1, batch_size: 4, grid_steps: 1}\n"
                f"generate: {{per_class: {per_class}, batch_size: 512, network_batch: 512, sampler: euler, "
                "steps: 1, workers: 1}\n")
            _stage(work, env, "prepare", "train-diffusion")
            out = subprocess.run([sys.executable, "-c", PEAK_RSS], cwd=work, env=env, check=True, capture_output=True,
                                 text=True)
            peaks[per_class * 10] = int(out.stdout.strip().splitlines()[-1]) / 1024
    return peaks


def generate_seconds_by_workers() -> dict[str, float]:
    """Wall time of `dmat generate` with one process vs one per available core (same store)."""
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = _tiny_project(work, 32)
        cores = available_cores()
        for workers in (1, cores):
            (work / "params.yaml").write_text(
                f"data: {{name: bench, path: {work / 'folder'}, val_size: 0}}\n"
                "train_diffusion: {steps: 1, batch_size: 4, grid_steps: 1}\n"
                f"generate: {{per_class: 20, batch_size: 16, steps: 6, workers: {workers}}}\n")
            _stage(work, env, "prepare", "train-diffusion")
            started = time.perf_counter()
            _stage(work, env, "generate")
            seconds[f"{workers} workers"] = time.perf_counter() - started
    return seconds


def run() -> dict:
    speed = {name: training_images_per_s(cfg) for name, cfg in TRAINING_CASES.items()}
    with_blocks = training_images_per_s(TRAINING_CASES["none"], resample_blocks=True)
    peaks = generate_peak_rss_mb()
    small, large = sorted(peaks)
    by_workers = generate_seconds_by_workers()
    one, many = by_workers.values()
    return {
        "train_images_per_s": {mode: round(v, 1) for mode, v in speed.items()},
        "train_speed_relative_to_none": {mode: round(v / speed["none"], 2) for mode, v in speed.items()},
        "train_speedup_plain_resampling_vs_blocks": round(speed["none"] / with_blocks, 2),
        "sampling_images_per_s_18_steps": {"unet-tiny": round(sampling_images_per_s("unet-tiny", 16), 2),
                                           "ddpmpp-cifar": round(sampling_images_per_s("ddpmpp-cifar", 2), 3)},
        "generate_peak_rss_mb": {str(n): round(mb) for n, mb in peaks.items()},
        "generate_peak_rss_ratio": round(peaks[large] / peaks[small], 2),
        "generate_seconds": {k: round(v, 1) for k, v in by_workers.items()},
        "generate_speedup_from_workers": round(one / many, 2),
        "precision": precision_table(),
    }
