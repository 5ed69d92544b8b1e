"""The classifier stages' part of the skeleton (`train_reference`, `train`): epochs of SGD on (mixed) batches of
the training store, each scored on data/real/val, the best epoch kept beside the last."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from dmat.artifacts.records import ClassifierConfig
from dmat.config import Params
from dmat.core.classifiers import build_classifier
from dmat.core.losses import one_cycle_lr, param_groups_without_bn_decay
from dmat.core.rng import seeded_generator
from dmat.data.augment import augmentation_for
from dmat.data.normalisation import normalisation
from dmat.data.sampler import MixedBatchSampler
from dmat.data.store import ArrayStore
from dmat.data.tensors import to_device, to_unit_tensor
from dmat.distributed import World, all_reduce_sum
from dmat.files import atomic_path
from dmat.stage_setup import classifier_probe_passes
from dmat.training.skeleton import ModelTraining


class ClassifierTraining(ModelTraining):
    """A classifier trained epoch by epoch on (mixed) batches of its training store with SGD, scored after every
    epoch; the best epoch by `SELECT_BY` is kept beside the last. A subclass implements `step` (its loss),
    `validate` and `epoch_summary`, and may add to each step (`after_step`, `show_progress`)."""

    CHECKPOINTS: ClassVar[tuple[Path, Path]]  # (best, last)
    SELECT_BY: ClassVar[str]  # the validation figure that picks the best epoch
    CURVES: ClassVar[Path]  # the per-epoch rows as CSV
    CURVES_EACH_EPOCH: ClassVar[bool] = False  # rewrite them after every epoch too, not only at the end
    TRAIN_FIGURES: ClassVar[tuple[str, ...]]  # the epoch's training accuracies, from the counts `step` returns

    def __init__(self, params: Params, w: World, real: ArrayStore, val: ArrayStore, *,
                 synthetic: ArrayStore | None = None, rows: np.ndarray, fraction: float):
        """Trains on `real` and on `rows` of the `synthetic` store, which fill `fraction` of every batch; picks the
        best epoch on `val`."""
        super().__init__(params, w)
        cfg, self.real, self.val, self.synthetic = self.cfg, real, val, synthetic
        self.sampler = MixedBatchSampler(len(real), rows, batch_size=cfg.batch_size, fraction=fraction,
                                         seed=params.base.seed)
        self.total_steps = cfg.epochs * self.sampler.steps_per_epoch
        dataset = real.meta.source.get("dataset", "")
        mean, std = normalisation(real)
        self.model_config = ClassifierConfig(name=cfg.model, num_classes=len(real.classes), mean=tuple(mean),
                                             std=tuple(std), dataset=dataset, input_shape=tuple(real.image_shape))
        self.model = build_classifier(cfg.model, num_classes=len(real.classes), mean=mean, std=std).to(w.device)
        self.optimizer = torch.optim.SGD(param_groups_without_bn_decay(self.model, cfg.weight_decay), lr=cfg.lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        self.augment = augmentation_for(dataset) if cfg.augment else None

    def step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One optimiser step on this rank's batch (`generator`: its attack's draws, if any). Returns float64
        [loss·n, the `TRAIN_FIGURES`' counts, n] on the device (no host sync)."""
        raise NotImplementedError

    def after_step(self, global_step: int) -> None:
        """What follows each optimiser step (a weight average's update)."""

    def show_progress(self, step: int, totals: torch.Tensor, progress: tqdm) -> None:
        """The progress bar's figures after this epoch's `step` (`totals`: the sums so far)."""

    def batch(self, plan) -> tuple[torch.Tensor, torch.Tensor]:
        """The images in [0, 1] and labels of a batch plan's real rows, then its generated rows."""
        images, labels = self.real.read(plan.real)
        if len(plan.synthetic):
            syn_images, syn_labels = self.synthetic.read(plan.synthetic)
            images, labels = np.concatenate([images, syn_images]), np.concatenate([labels, syn_labels])
        return to_unit_tensor(images, self.world.device), to_device(labels, self.world.device)

    def train_epoch(self, progress: tqdm) -> dict[str, float]:
        """One epoch of optimiser steps on this rank's share of every batch (augmented, one-cycle learning rate),
        each a step of `progress`: the mean loss and `TRAIN_FIGURES` over all ranks, and the last learning rate."""
        cfg, w = self.cfg, self.world
        self.model.train()
        generator = seeded_generator(self.params.base.seed, w.rank, self.epoch)
        totals = torch.zeros(len(self.TRAIN_FIGURES) + 2, dtype=torch.float64, device=w.device)  # as `step`'s
        for step, plan in enumerate(self.sampler.epoch(self.epoch, rank=w.rank, world_size=w.size)):
            global_step = self.epoch * self.sampler.steps_per_epoch + step
            x, y = self.batch(plan)
            if self.augment is not None:
                x = self.augment(x, generator=generator)
            for group in self.optimizer.param_groups:
                group["lr"] = one_cycle_lr(global_step, self.total_steps, cfg.lr, cfg.warmup_fraction)
            totals += self.step(x, y, generator)
            self.after_step(global_step)
            progress.update(1)
            self.show_progress(step, totals, progress)
        loss_sum, *counts, n = all_reduce_sum(w, totals).tolist()
        return {"train_loss": loss_sum / n, **{name: count / n for name, count in zip(self.TRAIN_FIGURES, counts,
                                                                                       strict=True)},
                "lr": self.optimizer.param_groups[0]["lr"]}

    def validate(self) -> dict[str, float]:
        """The epoch's validation figures (`SELECT_BY` among them), after its training."""
        raise NotImplementedError

    def epoch_summary(self, row: dict[str, float]) -> str:
        """The epoch's figures on the console, between `epoch i/n:` and its duration."""
        raise NotImplementedError

    def log_inputs(self, tracked) -> None:
        tracked.log_store(self.real, "real/train", context="training")
        tracked.log_store(self.val, "real/val", context="validation")

    def probe_passes(self):
        return classifier_probe_passes(self.model, self.cfg.batch_size, self.real.image_shape, self.world,
                                       self.cfg.micro_batch)

    def workload(self) -> dict[str, Any]:
        return {**super().workload(), "classes": len(self.real.classes)}

    def train(self, tracked) -> None:
        cfg, w = self.cfg, self.world
        with self.progress_bar(self.total_steps, self.epoch * self.sampler.steps_per_epoch) as progress:
            while self.epoch < cfg.epochs:
                started = time.perf_counter()
                row = {"epoch": self.epoch + 1, **self.train_epoch(progress), **self.validate()}
                row["epoch_s"] = time.perf_counter() - started
                best = max((r[self.SELECT_BY] for r in self.history), default=-math.inf)
                self.history.append(row)
                self.epoch += 1
                if w.is_main:
                    self.save_epoch(is_best=row[self.SELECT_BY] > best)
                    tracked.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=self.epoch)
                    progress.write(f"epoch {self.epoch}/{cfg.epochs}: {self.epoch_summary(row)} "
                                   f"({row['epoch_s']:.0f}s)")

    def save_epoch(self, *, is_best: bool) -> None:
        best, last = self.CHECKPOINTS
        if is_best:  # best before last: a kill in between resumes from the previous epoch and redoes both
            self.save(best, with_optimizer=False)
        self.save(last)
        if self.CURVES_EACH_EPOCH:
            self.write_curves()

    def best_epoch(self) -> dict[str, float]:
        return max(self.history, key=lambda r: r[self.SELECT_BY])

    def write_curves(self) -> None:
        """The per-epoch rows, floats rounded to 6 digits. At the end too: a run resumed after its last epoch
        trains nothing more and still writes them."""
        with atomic_path(self.CURVES) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.history[0]))
            writer.writeheader()
            writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
                             for row in self.history)
