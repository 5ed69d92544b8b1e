"""`dmat known-distribution train --truth NAME`: a denoiser trained on a training set drawn from a known truth.

The training set is n points of the truth (a seeded draw), then the condition: a seeded share of the points
corrupted with Gaussian noise, or replaced by outliers far from every mode (`data`). The denoiser (a
registry network in EDM preconditioning) trains with the image pipeline's loss and diffusion-AT modes
(`dmat.core.diffusion_at`, `train.adversarial`), Adam with a cosine decay to 0.

Deterministic for a seed: the data, the initialisation, the batches and the training noise come from streams
keyed by (base.seed, purpose, truth), so every AT mode of a seed sees the same training set, starts from the
same weights and draws the same batches; only the loss differs. Training takes seconds, so there is no
resumable checkpoint: a killed run starts again.

Writes models/<truth>/denoiser.pt, data/<truth>/train.npz and metrics/train_<truth>.json.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from dmat.artifacts import known_distribution as layout
from dmat.checkpoint import save_checkpoint
from dmat.config import ParamsError, as_dict, flatten
from dmat.core.denoisers import DENOISERS, build_denoiser
from dmat.core.diffusion_at import DiffusionATConfig, diffusion_training_loss
from dmat.core.known_distribution import GaussianMixture, corrupt, replace_with_outliers
from dmat.core.rng import seeded_generator
from dmat.files import sha256_file, write_json
from dmat.known_distribution_config import KnownDataConfig, KnownDistributionParams, KnownTrainConfig
from dmat.stage_setup import apply_torch
from dmat.tracking import stage_run

STAGE = "kd-train"
SECTIONS = ("base", "data", "train")
# Random streams, keyed (seed, purpose, truth): one per use, so changing one knob leaves the other draws alone.
DATA, CORRUPTION, OUTLIERS, BATCHES, TRAINING_NOISE = range(5)


def at_config(train: KnownTrainConfig) -> DiffusionATConfig:
    a = train.adversarial
    return DiffusionATConfig(mode=a.mode, lam=a.lam, rho=a.rho, floor_min=a.floor_min, floor_max=a.floor_max,
                             step_size=a.step_size, detach_clean=a.detach_clean, fraction=a.fraction,
                             p_mean=train.p_mean, p_std=train.p_std)


def draw_training_set(truth: GaussianMixture, data: KnownDataConfig, seed: int, stream: int) -> layout.TrainingSet:
    """n true points, then the condition's corruption and outliers (each from its own stream)."""
    points, labels, _ = truth.sample(data.n, seeded_generator(seed, DATA, stream))
    points, corrupted = corrupt(points, data.corrupt_fraction, data.corrupt_sigma,
                                seeded_generator(seed, CORRUPTION, stream))
    points, labels, outlier = replace_with_outliers(points, labels, truth, data.outlier_fraction,
                                                    seeded_generator(seed, OUTLIERS, stream), data.outlier_radii)
    return layout.TrainingSet(points, labels, (corrupted & ~outlier).numpy(), outlier.numpy())


def train_denoiser(denoiser: torch.nn.Module, training: layout.TrainingSet, cfg: KnownTrainConfig, seed: int,
                   stream: int, report) -> list[dict[str, float]]:
    """Adam with a cosine decay to 0 on the diffusion training loss; per interval means of the loss terms."""
    at = at_config(cfg)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda step: 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
    batches, noise = seeded_generator(seed, BATCHES, stream), seeded_generator(seed, TRAINING_NOISE, stream)
    log, rows, started = [], [], time.perf_counter()
    denoiser.train()
    for step in tqdm(range(1, cfg.steps + 1), desc="kd-train", unit="step", mininterval=2):
        index = torch.randint(0, len(training.points), (cfg.batch_size,), generator=batches)
        loss, stats = diffusion_training_loss(denoiser, training.points[index], training.labels[index], at,
                                              generator=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()
        schedule.step()
        # (the regulariser is NaN for the samples `fraction` leaves out)
        rows.append(torch.stack([loss.detach(), stats["denoise_loss"], stats["regulariser"]]).nanmean(dim=1))
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_mean, denoise_mean, regulariser_mean = torch.stack(rows).nanmean(dim=0).tolist()
            entry = {"step": step, "loss": loss_mean, "denoise_loss": denoise_mean, "regulariser": regulariser_mean,
                     "interval_s": time.perf_counter() - started}
            log.append(entry)
            report.log_metrics({k: v for k, v in entry.items() if k != "step"}, step=step)
            rows, started = [], time.perf_counter()
    return log


def run(params: KnownDistributionParams, truth: str) -> dict:
    cfg = params.truth(truth)
    if cfg.model not in DENOISERS:
        raise ParamsError(f"truths.{truth}.model = {cfg.model!r} is not allowed: expected one of "
                          f"{', '.join(DENOISERS)}")
    apply_torch(params.base)  # seeds torch: the initialisation is the same for every AT mode of a seed
    mixture = layout.truth_of(cfg)
    stream, seed = layout.truth_key(truth), params.base.seed
    training = draw_training_set(mixture, params.data, seed, stream)
    model_config = {"name": cfg.model, "num_classes": mixture.num_classes, "label_dropout": 0.0,
                    **layout.denoiser_geometry(mixture.shape)}
    denoiser = build_denoiser(**model_config)
    with stage_run(f"{STAGE}@{truth}", params, SECTIONS) as tracked:
        tracked.log_params({**flatten({"truth": as_dict(cfg)}), "truth.name": truth,
                            "model.parameters": sum(p.numel() for p in denoiser.parameters())})
        log = train_denoiser(denoiser, training, params.train, seed, stream, tracked)
        layout.save_training_set(layout.training_set_file(truth), training)
        training_file = layout.training_set_file(truth)
        tracked.log_dataset(f"known-distribution/{truth}/train", str(training_file.resolve()),
                            sha256_file(training_file), context="training", points=len(training.points))
        save_checkpoint(layout.model_file(truth), {
            "format": layout.MODEL_FORMAT, "model_config": model_config, "model": denoiser.state_dict(),
            "truth": truth, "truth_config": as_dict(cfg), "data_config": as_dict(params.data),
            "train_config": as_dict(params.train), "seed": seed, "log": log, "mlflow_run_id": tracked.run_id})
        metrics = {"loss": log[-1]["loss"], "denoise_loss": log[-1]["denoise_loss"],
                   "regulariser": log[-1]["regulariser"], "train_s": sum(e["interval_s"] for e in log),
                   "corrupted": int(np.sum(training.corrupted)), "outliers": int(np.sum(training.outlier)),
                   "points": len(training.points)}
        tracked.log_metrics({k: v for k, v in metrics.items() if k not in ("loss", "denoise_loss", "regulariser")})
        write_json(layout.metrics_file(layout.TRAIN_STAGE, truth), metrics)
    return metrics
