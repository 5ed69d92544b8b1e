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

from dmat.config import Params
from dmat.core.classifiers import build_classifier
from dmat.core.losses import param_groups_without_bn_decay
from dmat.data.augment import augmentation_for
from dmat.data.normalisation import normalisation
from dmat.data.sampler import MixedBatchSampler
from dmat.data.store import ArrayStore
from dmat.distributed import World
from dmat.files import atomic_path
from dmat.stage_setup import classifier_probe_passes
from dmat.training.skeleton import ModelTraining


class ClassifierTraining(ModelTraining):
    """A classifier trained epoch by epoch on (mixed) batches of its training store with SGD, scored after every
    epoch; the best epoch by `SELECT_BY` is kept beside the last. A subclass implements `train_epoch` and
    `validate` (each returns its part of the epoch's row) and `epoch_summary`."""

    CHECKPOINTS: ClassVar[tuple[Path, Path]]  # (best, last)
    SELECT_BY: ClassVar[str]  # the validation figure that picks the best epoch
    CURVES: ClassVar[Path]  # the per-epoch rows as CSV
    CURVES_EACH_EPOCH: ClassVar[bool] = False  # rewrite them after every epoch too, not only at the end

    def __init__(self, params: Params, w: World, real: ArrayStore, *, rows: np.ndarray, fraction: float):
        """Trains on `real` and on `rows` of the generated store, which fill `fraction` of every batch."""
        super().__init__(params, w)
        cfg, self.real = self.cfg, real
        self.sampler = MixedBatchSampler(len(real), rows, batch_size=cfg.batch_size, fraction=fraction,
                                         seed=params.base.seed)
        self.total_steps = cfg.epochs * self.sampler.steps_per_epoch
        dataset = real.meta.source.get("dataset", "")
        mean, std = normalisation(real)
        self.model_config = {"name": cfg.model, "num_classes": len(real.classes), "mean": mean, "std": std,
                             "dataset": dataset, "input_shape": list(real.image_shape)}
        self.model = build_classifier(cfg.model, num_classes=len(real.classes), mean=mean, std=std).to(w.device)
        self.optimizer = torch.optim.SGD(param_groups_without_bn_decay(self.model, cfg.weight_decay), lr=cfg.lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        self.augment = augmentation_for(dataset) if cfg.augment else None

    def train_epoch(self, progress: tqdm) -> dict[str, float]:
        """One epoch of optimiser steps (each one a step of `progress`): its training figures."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """The epoch's validation figures, `SELECT_BY` among them."""
        raise NotImplementedError

    def epoch_summary(self, row: dict[str, float]) -> str:
        """The epoch's figures on the console, between `epoch i/n:` and its duration."""
        raise NotImplementedError

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
                    progress.write(f"epoch {self.epoch}/{cfg.epochs}: {self.epoch_summary(row)} ({row['epoch_s']:.0f}s)")

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
