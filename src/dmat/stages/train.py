"""`train`: adversarial training of the classifier on mixed real/generated batches (docs/method.md).

TRADES (or PGD-AT) with SGD + Nesterov, weight decay except on BatchNorm, a one-cycle learning
rate, and weight averaging (EMA). After every epoch the EMA model is scored on data/real/val
(clean accuracy and PGD-CW accuracy, eval mode) and the best by robust accuracy is kept.

Writes models/classifier/{last,best}.pt, metrics/train.json and plots/train_curves.csv. While it
trains, both checkpoints are written atomically after every epoch into the stage's work directory
(`layout.work_dir`); re-running after a kill resumes from there, provided they belong to the same
configuration and inputs, and the finished ones move to models/classifier. Under torchrun each
process trains on its share of every global batch (DDP).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dmat import pipeline
from dmat.artifacts import layout
from dmat.artifacts.loaders import load_classifier, load_mix_manifest, open_mixed_store
from dmat.checkpoint import fingerprint, load_resumable, publish, restore_training, save_checkpoint
from dmat.config import Params, ParamsError, as_dict
from dmat.core.attacks import default_step_size, pgd
from dmat.core.classifiers import CLASSIFIERS, build_classifier
from dmat.core.ema import WeightAverage, trades_ema_decay
from dmat.core.losses import one_cycle_lr, param_groups_without_bn_decay, pgd_at_loss, trades_loss
from dmat.core.precision import Decision, full_precision
from dmat.core.rng import seeded_generator
from dmat.data.augment import augmentation_for
from dmat.data.normalisation import normalisation
from dmat.data.sampler import MixedBatchSampler
from dmat.data.store import ArrayStore
from dmat.data.tensors import to_unit_tensor
from dmat.distributed import World, all_reduce_sum, broadcast_object, world
from dmat.files import atomic_path, write_json
from dmat.stage_setup import (
    apply_torch,
    check_precision,
    choose_setting,
    classifier_probe_passes,
    log_precision,
    training_network,
)
from dmat.tracking import stage_run

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name
WORK = layout.work_dir(STAGE)  # resumable checkpoints while training; published at the end
SECTIONS = DECLARED.sections  # what its MLflow run logs: the params sections it reads
EVAL_BATCH = 256


def check_config(params: Params, device: str) -> None:
    """Checks that need the registries or the device: still before anything is written."""
    cfg = params.train
    if cfg.model not in CLASSIFIERS:
        raise ParamsError(f"train.model = {cfg.model!r} is not allowed: expected one of {', '.join(CLASSIFIERS)}")
    check_precision(params.base, device)


class Trainer:
    """The training state of one run: model, EMA, optimiser, data, schedule, history."""

    def __init__(self, params: Params, w: World):
        cfg = self.cfg = params.train
        self.params, self.world = params, w
        self.real = ArrayStore.open(layout.REAL_TRAIN)
        self.val = ArrayStore.open(layout.REAL_VAL)
        self.manifest, rows = load_mix_manifest()
        self.fraction = self.manifest.synthetic_fraction
        self.synthetic = open_mixed_store(self.manifest) if self.fraction > 0 else None  # the store the mix names
        self.sampler = MixedBatchSampler(len(self.real), rows, batch_size=cfg.batch_size, fraction=self.fraction,
                                         seed=params.base.seed)
        self.total_steps = cfg.epochs * self.sampler.steps_per_epoch
        self.dataset = self.real.meta.source.get("dataset", "")
        mean, std = normalisation(self.real)
        self.model_config = {"name": cfg.model, "num_classes": len(self.real.classes), "mean": mean, "std": std,
                             "dataset": self.dataset, "input_shape": list(self.real.image_shape)}
        self.model = build_classifier(cfg.model, num_classes=len(self.real.classes), mean=mean, std=std)
        self.model.to(w.device)
        self.ema = WeightAverage(self.model)
        self.optimizer = torch.optim.SGD(param_groups_without_bn_decay(self.model, cfg.weight_decay), lr=cfg.lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        # Set by use(), once the precision is chosen; a resumed run brings its recorded choice and loss scale.
        self.trained, self.scaler, self.precision = None, None, None
        self.recorded_precision, self.recorded_scaler = None, None
        self.augment = augmentation_for(self.dataset) if cfg.augment else None
        self.fingerprint = fingerprint(as_dict(cfg), params.base.seed, self.real.digest, self.val.digest,
                                       self.manifest.synthetic.sha256, self.manifest.indices_sha256,
                                       self.fraction)
        self.epoch, self.history, self.run_id = 0, [], None

    # --- checkpoints -------------------------------------------------------------------------------------

    def resume(self) -> bool:
        """Load the work directory's last.pt if it belongs to this configuration and these inputs."""
        state = load_resumable(WORK / layout.CLASSIFIER_LAST.name, format=layout.CLASSIFIER_FORMAT,
                               fingerprint=self.fingerprint, map_location=self.world.device)
        if state is None:
            return False
        restore_training(state, model=self.model, ema=self.ema, optimizer=self.optimizer)
        self.epoch, self.history, self.run_id = state["epoch"], state["history"], state["mlflow_run_id"]
        self.recorded_precision, self.recorded_scaler = state.get("precision"), state.get("grad_scaler")
        return True

    def probe_passes(self):
        """Forward and backward passes of this network at this rank's batch size, for the `auto` probe."""
        return classifier_probe_passes(self.model, self.cfg.batch_size, self.real.image_shape, self.world)

    def workload(self) -> dict:
        """What the probe measures, for the machine's kept precision decision."""
        return {"stage": STAGE, "network": self.cfg.model, "batch": max(1, self.cfg.batch_size // self.world.size),
                "image_shape": list(self.real.image_shape), "classes": len(self.real.classes)}

    def use(self, decision: Decision) -> None:
        """Train from now on in `decision`'s setting (the EMA copy stays float32 and contiguous)."""
        self.precision = decision
        self.trained, self.scaler = training_network(self.model, decision, self.world, compile=self.params.base.compile,
                                                     scaler_state=self.recorded_scaler)

    def checkpoint_state(self, *, with_optimizer: bool) -> dict[str, Any]:
        state = {
            "format": layout.CLASSIFIER_FORMAT, "fingerprint": self.fingerprint, "epoch": self.epoch,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "model_config": self.model_config,
            "classes": list(self.real.classes), "threat": {"norm": self.cfg.attack.norm, "eps": self.cfg.attack.eps},
            "mlflow_run_id": self.run_id, "history": self.history, "train_config": as_dict(self.cfg),
            "precision": self.precision.record(),
        }
        if with_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    # --- one epoch ---------------------------------------------------------------------------------------

    def batch(self, plan) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.real.read(plan.real)
        if len(plan.synthetic):
            syn_images, syn_labels = self.synthetic.read(plan.synthetic)
            images, labels = np.concatenate([images, syn_images]), np.concatenate([labels, syn_labels])
        return to_unit_tensor(images, self.world.device), torch.from_numpy(labels).to(self.world.device)

    def train_epoch(self, progress: tqdm) -> dict[str, float]:
        cfg, w = self.cfg, self.world
        self.model.train()
        generator = seeded_generator(self.params.base.seed, w.rank, self.epoch)
        loss_fn = trades_loss if cfg.loss == "trades" else pgd_at_loss
        # PGD-AT trains on plain CE, as the reference; label smoothing is TRADES' clean term only
        extra = {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing} if cfg.loss == "trades" else {}
        totals = torch.zeros(4, dtype=torch.float64)  # loss·n, clean correct, adversarial correct, n
        for step, plan in enumerate(self.sampler.epoch(self.epoch, rank=w.rank, world_size=w.size)):
            global_step = self.epoch * self.sampler.steps_per_epoch + step
            x, y = self.batch(plan)
            if self.augment is not None:
                x = self.augment(x, generator=generator)
            for group in self.optimizer.param_groups:
                group["lr"] = one_cycle_lr(global_step, self.total_steps, cfg.lr, cfg.warmup_fraction)
            loss, stats = loss_fn(self.trained, x, y, norm=cfg.attack.norm, eps=cfg.attack.eps,
                                  step_size=cfg.attack.step_size, steps=cfg.attack.steps, generator=generator, **extra)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.ema.update(self.model, trades_ema_decay(global_step + 1, self.total_steps, cfg.ema_tau,
                                                         cfg.warmup_fraction))
            n = len(y)
            totals += torch.tensor([float(stats["loss"]) * n, float(stats["clean_acc"]) * n,
                                    float(stats["adv_acc"]) * n, n], dtype=torch.float64)
            progress.update(1)
            progress.set_postfix(loss=f"{float(stats['loss']):.3f}", adv_acc=f"{float(stats['adv_acc']):.2f}")
        totals = all_reduce_sum(w, totals)
        loss_sum, clean, adv, n = totals.tolist()
        return {"train_loss": loss_sum / n, "train_clean_acc": clean / n, "train_adv_acc": adv / n,
                "lr": self.optimizer.param_groups[0]["lr"]}

    @full_precision()
    def validate(self) -> dict[str, float]:
        """Clean and PGD-CW accuracy of the EMA model (eval mode) on this rank's share of data/real/val.

        PGD step size 2.5·eps/steps (Madry et al.'s rule), uniform random start. Always float32 and
        contiguous, whatever the training setting: a low-precision attack can mask gradients.
        """
        cfg, w = self.cfg, self.world
        n = len(self.val) if cfg.val_limit is None else min(cfg.val_limit, len(self.val))
        rows = np.array_split(np.arange(n), w.size)[w.rank]
        model = self.ema.module.eval()
        generator = seeded_generator(self.params.base.seed, w.rank)
        counts = torch.zeros(3, dtype=torch.float64)  # clean correct, robust correct, n
        for start in range(0, len(rows), EVAL_BATCH):
            images, labels = self.val.read(rows[start:start + EVAL_BATCH])
            x, y = to_unit_tensor(images, w.device), torch.from_numpy(labels).to(w.device)
            x_adv = pgd(model, x, y, norm=cfg.attack.norm, eps=cfg.attack.eps, loss="cw", generator=generator,
                        step_size=2.5 * cfg.attack.eps / cfg.val_attack_steps, steps=cfg.val_attack_steps)
            with torch.no_grad():
                counts += torch.tensor([(model(x).argmax(1) == y).sum().item(),
                                        (model(x_adv).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
        counts = all_reduce_sum(w, counts)
        return {"val_clean_acc": counts[0].item() / max(counts[2].item(), 1),
                "val_robust_acc": counts[1].item() / max(counts[2].item(), 1)}


def run(params: Params) -> dict:
    device = apply_torch(params.base)
    check_config(params, device)
    with world(device) as w:
        trainer = Trainer(params, w)
        trainer.resume()
        trainer.use(choose_setting(params.base, w, trainer.probe_passes, trainer.recorded_precision,
                                    workload=trainer.workload()))
        with stage_run(STAGE, params, SECTIONS, resume_run_id=trainer.run_id, enabled=w.is_main) as tracked:
            trainer.run_id = broadcast_object(w, tracked.run_id)
            if not tracked.continued:
                _log_inputs(tracked, trainer)
                log_precision(tracked, trainer.precision)
            _train(trainer, tracked)
            metrics = _finish(trainer, tracked)
    return metrics


def _log_inputs(tracked, trainer: Trainer) -> None:
    tracked.log_store(trainer.real, "real/train", context="training")
    tracked.log_store(trainer.val, "real/val", context="validation")
    synthetic = trainer.manifest.synthetic
    tracked.log_dataset("synthetic", str(Path(synthetic.path).resolve()), synthetic.sha256, context="training",
                        used=synthetic.used, fraction=trainer.fraction)
    tracked.log_params({"mix.synthetic_fraction": trainer.fraction, "mix.synthetic_used": synthetic.used,
                        "mix.synthetic_sha256": synthetic.sha256, "model.num_classes": len(trainer.real.classes),
                        "steps_per_epoch": trainer.sampler.steps_per_epoch, "total_steps": trainer.total_steps,
                        "attack.step_size_used": trainer.cfg.attack.step_size or default_step_size(
                            trainer.cfg.attack.norm, trainer.cfg.attack.eps, trainer.cfg.attack.steps)})


def _train(trainer: Trainer, tracked) -> None:
    w, cfg = trainer.world, trainer.cfg
    done = trainer.epoch * trainer.sampler.steps_per_epoch
    with tqdm(total=trainer.total_steps, initial=done, desc="train", unit="step", disable=not w.is_main,
              mininterval=2) as progress:
        while trainer.epoch < cfg.epochs:
            started = time.perf_counter()
            row = {"epoch": trainer.epoch + 1, **trainer.train_epoch(progress), **trainer.validate()}
            row["epoch_s"] = time.perf_counter() - started
            best = max((r["val_robust_acc"] for r in trainer.history), default=-math.inf)
            trainer.history.append(row)
            trainer.epoch += 1
            if w.is_main:
                _save_epoch(trainer, is_best=row["val_robust_acc"] > best)
                tracked.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=trainer.epoch)
                progress.write(f"epoch {trainer.epoch}/{cfg.epochs}: val clean {row['val_clean_acc']:.3f} "
                               f"robust {row['val_robust_acc']:.3f} ({row['epoch_s']:.0f}s)")


def _save_epoch(trainer: Trainer, *, is_best: bool) -> None:
    if is_best:  # best before last: a kill in between resumes from the previous epoch and redoes both
        save_checkpoint(WORK / layout.CLASSIFIER_BEST.name, trainer.checkpoint_state(with_optimizer=False))
    save_checkpoint(WORK / layout.CLASSIFIER_LAST.name, trainer.checkpoint_state(with_optimizer=True))
    _write_curves(trainer.history)


def _write_curves(history: list[dict]) -> None:
    with atomic_path(layout.TRAIN_CURVES) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} for row in history)


def _finish(trainer: Trainer, tracked) -> dict:
    best = max(trainer.history, key=lambda r: r["val_robust_acc"])
    last = trainer.history[-1]
    metrics = {
        "epochs": trainer.epoch, "steps": trainer.total_steps, "best_epoch": best["epoch"],
        "best_val_clean_acc": best["val_clean_acc"], "best_val_robust_acc": best["val_robust_acc"],
        "last_val_clean_acc": last["val_clean_acc"], "last_val_robust_acc": last["val_robust_acc"],
        "train_s": sum(r["epoch_s"] for r in trainer.history), **trainer.precision.headline(),
    }
    if trainer.world.is_main:
        write_json(layout.metrics_file(STAGE), {("train_" + k if k in ("epochs", "steps") else k): v
                                                for k, v in metrics.items()})
        write_json(layout.report_file(STAGE), {**metrics, **trainer.precision.summary()})
        tracked.log_metrics({k: v for k, v in metrics.items()
                             if isinstance(v, int | float) and k not in ("epochs", "steps")})
        _write_curves(trainer.history)  # again here: a run resumed after its last epoch trains nothing more
        tracked.log_artifact(layout.TRAIN_CURVES)
        best_model, _ = load_classifier(WORK / layout.CLASSIFIER_BEST.name)
        example = np.zeros((2, *[trainer.real.image_shape[i] for i in (2, 0, 1)]), dtype=np.float32)
        tracked.log_torch_model(best_model, input_example=example)
        publish(WORK, layout.CLASSIFIER_DIR, (layout.CLASSIFIER_BEST.name, layout.CLASSIFIER_LAST.name))
    return metrics

