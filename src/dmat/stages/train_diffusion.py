"""`train_diffusion`: class-conditional EDM on data/real/train, with adversarial training (docs/method.md).

The diffusion model sees only the real training split (never val or test). Optionally a fixed
share of the training images is corrupted with Gaussian noise (`train_diffusion.corrupt`): the
experiment that tests the diffusion-AT claim. Adam with a linear learning-rate warm-up; an EMA of
the weights with a half-life in images (EDM), which `generate` samples from.

Writes models/diffusion/checkpoint.pt (EMA and raw weights, optimiser, config, step, MLflow run
id). While it trains, the checkpoint is written atomically every `checkpoint_every` steps into the
stage's work directory (`layout.work_dir`), which a re-run after a kill resumes from when it belongs
to the same configuration and data; the finished checkpoint moves to models/diffusion. Under torchrun
(`base.nproc`) each process trains on its share of every global batch (DDP), in micro-batches of at most
`train_diffusion.micro_batch` images whose gradients accumulate before each optimiser step; rank 0 writes
and logs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from dmat import pipeline
from dmat.artifacts import layout
from dmat.artifacts.records import DenoiserConfig, DiffusionHeader, to_json
from dmat.checkpoint import fingerprint
from dmat.config import Params, ParamsError, as_dict
from dmat.core.accumulation import accumulate_gradients, deferred_sync
from dmat.core.denoisers import DENOISERS, build_denoiser
from dmat.core.diffusion_at import DiffusionATConfig, diffusion_training_loss, draw_training_noise
from dmat.core.edm import sample_training_sigma
from dmat.core.ema import WeightAverage, half_life_decay
from dmat.core.precision import network_passes
from dmat.core.rng import seeded_generator
from dmat.core.samplers import edm_sigma_steps, heun_sampler, image_noise, to_uint8
from dmat.data.sampler import MixedBatchSampler
from dmat.data.store import ArrayStore
from dmat.data.tensors import to_device, to_model_space
from dmat.distributed import World, all_gather_rows
from dmat.plots import image_grid
from dmat.stage_setup import probe_batch
from dmat.training.skeleton import ModelTraining

DECLARED = pipeline.for_module(__name__)
# Noise-level bands for the loss split: where the denoiser's work is fine detail vs global layout.
SIGMA_BANDS = ((0.0, 0.2), (0.2, 1.0), (1.0, 5.0), (5.0, float("inf")))
GRID_PER_CLASS = 10


def at_config(params: Params) -> DiffusionATConfig:
    cfg = params.train_diffusion
    a = cfg.adversarial
    return DiffusionATConfig(mode=a.mode, lam=a.lam, rho=a.rho, floor_min=a.floor_min, floor_max=a.floor_max,
                             step_size=a.step_size, detach_clean=a.detach_clean, fraction=a.fraction,
                             p_mean=cfg.p_mean, p_std=cfg.p_std)


def corrupted_rows(n: int, params: Params) -> np.ndarray:
    """Which training images are corrupted: a fixed seeded choice of `corrupt.fraction` of them."""
    fraction = params.train_diffusion.corrupt.fraction if params.train_diffusion.corrupt.sigma > 0 else 0.0
    return np.random.default_rng([params.base.seed, 1]).random(n) < fraction


def corrupt(x0: torch.Tensor, rows: np.ndarray, chosen: np.ndarray, params: Params) -> torch.Tensor:
    """Add Gaussian noise to the chosen images; each image's noise is fixed (seeded by its row)."""
    mask = chosen[rows]
    if not mask.any():
        return x0
    noise = image_noise(params.base.seed + 1, 0, rows.tolist(), tuple(x0.shape[1:])).to(x0.device)
    sigma = params.train_diffusion.corrupt.sigma
    return torch.where(torch.from_numpy(mask).to(x0.device).reshape(-1, 1, 1, 1), x0 + sigma * noise, x0)


class DiffusionTrainer(ModelTraining):
    """The denoiser, its EMA and Adam, trained step by step on data/real/train."""

    DECLARED = DECLARED
    SECTION = "train_diffusion"
    NETWORKS = DENOISERS
    FORMAT = layout.DIFFUSION_FORMAT
    HEADER = DiffusionHeader
    CHECKPOINTS = (layout.DIFFUSION_CHECKPOINT,)
    COUNTER = "step"
    HISTORY = "log"  # one row per logging interval

    def __init__(self, params: Params, w: World):
        super().__init__(params, w)
        cfg = self.cfg
        self.real = ArrayStore.open(layout.REAL_TRAIN)
        if len(self.real) == 0:
            raise ParamsError(f"{layout.REAL_TRAIN} is empty: nothing to train the diffusion model on")
        h, w_, c = self.real.image_shape
        if h != w_:
            raise ParamsError(f"train_diffusion needs square images, {layout.REAL_TRAIN} holds {h}x{w_}")
        self.model_config = DenoiserConfig(name=cfg.model, img_resolution=h, in_channels=c,
                                           num_classes=len(self.real.classes), label_dropout=cfg.label_dropout)
        self.model = build_denoiser(cfg.model, **self.model_config.build_args())
        self.model.to(w.device)
        self.ema = WeightAverage(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        self.sampler = MixedBatchSampler(len(self.real), np.empty(0, np.int64), batch_size=cfg.batch_size,
                                         fraction=0.0, seed=params.base.seed)
        self.at = at_config(params)
        self.corrupted = corrupted_rows(len(self.real), params)
        self.fingerprint = fingerprint(as_dict(cfg), params.base.seed, self.real.digest)

    def probe_passes(self):
        h, w_, c = self.real.image_shape
        n = probe_batch(self.cfg.batch_size, self.cfg.micro_batch, self.world)
        generator = torch.Generator().manual_seed(0)
        inputs = (torch.rand(n, c, h, w_, generator=generator) * 2 - 1,
                  sample_training_sigma(n, p_mean=self.cfg.p_mean, p_std=self.cfg.p_std, generator=generator),
                  torch.zeros(n, dtype=torch.int64))
        return network_passes(self.model, [t.to(self.world.device) for t in inputs], self.world.device,
                              backward=True)

    def record(self) -> dict:
        return {"adversarial": as_dict(self.cfg.adversarial)}

    def log_inputs(self, tracked) -> None:
        tracked.log_store(self.real, "real/train", context="training")
        tracked.log_params({"model.parameters": sum(p.numel() for p in self.model.parameters())})

    def plan(self, step: int):
        """This rank's rows for global step `step` (epochs of the real store, reshuffled each epoch)."""
        epoch, start = divmod(step, self.sampler.steps_per_epoch)
        return next(self.sampler.epoch(epoch, start_step=start, rank=self.world.rank, world_size=self.world.size))

    def train_step(self) -> torch.Tensor:
        """One optimiser step; returns per-sample [σ, loss, denoise loss, regulariser] rows (detached, on the
        device: read at the logging interval, not every step)."""
        cfg, w = self.cfg, self.world
        plan = self.plan(self.step)
        images, labels = self.real.read(plan.real)
        x0 = corrupt(to_model_space(images, w.device), plan.real, self.corrupted, self.params)
        if cfg.augment:
            flip = torch.rand(len(x0), generator=seeded_generator(self.params.base.seed, w.rank, self.step)) < 0.5
            x0 = torch.where(to_device(flip.numpy(), w.device).reshape(-1, 1, 1, 1), x0.flip(3), x0)
        # σ, noise and perturbations of one step depend only on (seed, rank, step): exact resume. Drawn for the
        # whole batch first, so that micro-batches see the batch's own values.
        noise = draw_training_noise(x0, self.at, seeded_generator(self.params.base.seed + 1, w.rank, self.step,
                                                                  device=w.device))
        labels = to_device(labels, w.device)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(cfg.warmup_steps, 1))

        def loss_of(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
            loss, stats = diffusion_training_loss(self.trained, x0[part], labels[part], self.at,
                                                  noise=noise.rows(part))
            return loss.mean(), torch.stack([stats["sigma"], loss.detach(), stats["denoise_loss"],
                                             stats["regulariser"]], 1)

        self.optimizer.zero_grad(set_to_none=True)
        parts = accumulate_gradients(len(x0), cfg.micro_batch, loss_of, lambda loss: self.scaler.scale(loss).backward(),
                                     no_sync=deferred_sync(self.trained))
        self.scaler.unscale_(self.optimizer)  # fp16: true gradients below; an overflow still skips the step
        for param in self.model.parameters():  # EDM: a NaN or inf gradient must not poison the weights
            if param.grad is not None:
                torch.nan_to_num_(param.grad, nan=0, posinf=1e5, neginf=-1e5)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        images_seen = self.step * cfg.batch_size
        half_life = cfg.ema_half_life_images
        if cfg.ema_rampup_ratio is not None:
            half_life = min(half_life, images_seen * cfg.ema_rampup_ratio)
        self.ema.update(self.model, half_life_decay(cfg.batch_size, half_life))
        return torch.cat([rows for _, rows in parts])

    def train(self, tracked) -> None:
        """Steps up to `steps`: the interval's figures logged every `log_every`, checkpoints every
        `checkpoint_every`, both after the last step too."""
        cfg, w = self.cfg, self.world
        rows, started = [], time.perf_counter()
        with self.progress_bar(cfg.steps, self.step) as progress:
            while self.step < cfg.steps:
                rows.append(self.train_step())
                progress.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    metrics = _reduce_interval(w, torch.cat(rows), time.perf_counter() - started,
                                               len(rows) * cfg.batch_size)
                    self.log.append({"step": self.step, **metrics})
                    tracked.log_metrics(metrics, step=self.step)
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}", reg=f"{metrics['regulariser']:.4f}")
                    rows, started = [], time.perf_counter()
                if w.is_main and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                    self.save(layout.DIFFUSION_CHECKPOINT)

    def finish(self, tracked) -> dict:
        cfg, w = self.cfg, self.world
        last = self.log[-1] if self.log else {}
        metrics = {"steps": self.step, "images_seen": self.step * cfg.batch_size,
                   "train_s": sum(entry.get("interval_s", 0.0) for entry in self.log),
                   **{k: last[k] for k in ("loss", "denoise_loss", "regulariser", "images_per_s") if k in last},
                   **self.precision.headline()}
        if w.is_main:
            self.write_results(metrics, {f"diffusion_{key}": value for key, value in metrics.items()},
                               adversarial_mode=cfg.adversarial.mode, last_interval=last, log=self.log)
            grid = sample_grid(self.ema.module.eval(), len(self.real.classes), _chw(self.real.image_shape),
                               cfg.grid_steps, self.params.base.seed, w.device)
            tracked.log_image(grid, "samples_grid.png")
            tracked.log_dict(to_json(self.model_config), "model_config.json")
        return metrics


def interval_metrics(rows: torch.Tensor, seconds: float, images: int) -> dict[str, float]:
    """Means over a logging interval (R over the samples that had it), and the loss split by σ band."""
    sigma, loss, denoise, reg = rows.double().T
    metrics = {"loss": loss.mean().item(), "denoise_loss": denoise.mean().item(), "regulariser": reg.nanmean().item(),
               "images_per_s": images / max(seconds, 1e-9), "interval_s": seconds}
    for low, high in SIGMA_BANDS:
        band = (sigma >= low) & (sigma < high)
        if band.any():
            metrics[f"loss_sigma_{low:g}_{high:g}"] = loss[band].mean().item()
    return metrics


@torch.no_grad()
def sample_grid(denoiser: nn.Module, num_classes: int, shape: tuple[int, int, int], steps: int, seed: int,
                device: str) -> np.ndarray:
    """GRID_PER_CLASS samples per class, one row per class, with the deterministic Heun sampler."""
    labels = torch.arange(num_classes).repeat_interleave(GRID_PER_CLASS)
    noise = torch.cat([image_noise(seed, c, range(GRID_PER_CLASS), shape) for c in range(num_classes)])
    images = heun_sampler(denoiser, noise.to(device), labels.to(device), edm_sigma_steps(steps).to(device))
    return image_grid(to_uint8(images).cpu().numpy(), columns=GRID_PER_CLASS)


def _reduce_interval(w: World, rows: torch.Tensor, seconds: float, images: int) -> dict[str, float]:
    """Interval metrics over all ranks' samples (rank 0 logs them); ranks may hold different numbers of rows."""
    return interval_metrics(all_gather_rows(w, rows), seconds, images)


def _chw(hwc: tuple[int, int, int]) -> tuple[int, int, int]:
    return hwc[2], hwc[0], hwc[1]


def run(params: Params) -> dict:
    return DiffusionTrainer.run(params)
