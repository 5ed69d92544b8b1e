"""`train_reference`: the reference classifier, standard (non-adversarial) training on real data only.

The fixed yardstick for generated data: `evaluate_diffusion` measures data/synthetic with it (a classifier
trained on those images would grade its own homework), and `generate.filter_scorer: reference` keeps the
candidates it is most confident about, as Wang et al. 2023 select their 1M images with a standard WRN-28-10
trained on CIFAR-10 (`select_1M`). It reads data/real/{train,val,test} only: no generated data and nothing
of the diffusion model, so it is built once and shared by every diffusion variant.

Cross-entropy (optional label smoothing) with SGD + Nesterov, weight decay except on BatchNorm, linear
warm-up then cosine decay (`warmup_fraction` 0: plain cosine), crop + flip augmentation. Training steps
run in the precision and memory format `base.precision` / `base.memory_format` choose (`auto`: the
fastest in a short probe, as `train`); scoring is always float32. After every epoch the model (eval
mode) is scored on data/real/val; the best by clean accuracy is kept, and its clean accuracy on all of
data/real/test, with a 95% Wilson interval, is the headline.

Writes models/reference/{best,last}.pt (format `layout.REFERENCE_FORMAT`, never mistaken for a robust
checkpoint), metrics/train_reference.json, reports/train_reference.json (per-class test accuracy, history)
and plots/train_reference_curves.csv. While it trains, both checkpoints are written atomically after every
epoch into the stage's work directory (`layout.work_dir`); re-running after a kill resumes from there when
they belong to the same configuration and inputs, and the finished ones move to models/reference. Under
torchrun (`base.nproc`) each process trains on its share of every global batch (DDP), in micro-batches of
at most `train_reference.micro_batch` images whose gradients accumulate before each optimiser step.
"""

from __future__ import annotations

import csv
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dmat import pipeline
from dmat.artifacts import layout
from dmat.checkpoint import fingerprint, load_checkpoint, load_resumable, publish, save_checkpoint
from dmat.config import Params, ParamsError, as_dict
from dmat.core.accumulation import accumulate_gradients, deferred_sync
from dmat.core.classifiers import CLASSIFIERS, build_classifier
from dmat.core.losses import one_cycle_lr, param_groups_without_bn_decay
from dmat.core.precision import Decision, full_precision
from dmat.core.rng import seeded_generator
from dmat.core.stats import wilson_interval
from dmat.data.augment import augmentation_for
from dmat.data.normalisation import normalisation
from dmat.data.sampler import MixedBatchSampler
from dmat.data.store import ArrayStore
from dmat.data.tensors import to_device, to_unit_tensor
from dmat.distributed import World, all_reduce_sum, barrier, broadcast_buffers, broadcast_object, world
from dmat.errors import DataError
from dmat.files import atomic_path, write_json
from dmat.stage_setup import (
    apply_torch,
    check_precision,
    choose_setting,
    classifier_probe_passes,
    log_precision,
    probe_batch,
    training_network,
)
from dmat.tracking import stage_run

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name
WORK = layout.work_dir(STAGE)  # resumable checkpoints while training; published at the end
SECTIONS = DECLARED.sections  # what its MLflow run logs: the params sections it reads
EVAL_BATCH = 256
# metrics/train_reference.json, prefixed `reference_` (keys are unique across metrics files); the rest: report
HEADLINE = ("test_acc", "test_acc_low", "test_acc_high", "train_s")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor, *,
               label_smoothing: float, scaler: torch.amp.GradScaler | None = None,
               micro_batch: int | None = None) -> tuple[Tensor, Tensor]:
    """One optimiser step of standard training: cross-entropy of the batch, backward, SGD step.

    The whole step of this stage in one place: `model` runs it in the chosen precision, and `scaler`
    (fp16 only; a pass-through otherwise) scales the loss. With `micro_batch`, the batch runs forward and
    backward in micro-batches of at most that many images, their gradients accumulating before the step.
    Returns the batch's mean loss and its number of correct predictions, detached (on the device).
    """
    def loss_of(part: slice) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        logits = model(images[part])
        loss = F.cross_entropy(logits.float(), labels[part], label_smoothing=label_smoothing)
        return loss, (loss.detach(), (logits.detach().argmax(1) == labels[part]).sum())

    optimizer.zero_grad(set_to_none=True)
    parts = accumulate_gradients(len(labels), micro_batch, loss_of,
                                 (lambda loss: loss.backward()) if scaler is None
                                 else (lambda loss: scaler.scale(loss).backward()), no_sync=deferred_sync(model))
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if len(parts) == 1:
        return parts[0][1]
    loss = sum(mean * (part.stop - part.start) for part, (mean, _) in parts) / len(labels)
    return loss, sum(correct for _, (_, correct) in parts)


@full_precision()
@torch.no_grad()
def correct_per_class(model: nn.Module, store: ArrayStore, rows: np.ndarray, device: str) -> Tensor:
    """(2, K) float64 on `device`: per class, the correct predictions of `model` (eval mode, float32) on `rows`,
    and the images."""
    counts = torch.zeros(2, len(store.classes), dtype=torch.float64, device=device)
    for start in range(0, len(rows), EVAL_BATCH):
        images, labels = store.read(rows[start:start + EVAL_BATCH])
        y = to_device(labels, device)
        hits = (model(to_unit_tensor(images, device)).argmax(1) == y).double()
        counts[0].index_add_(0, y, hits)
        counts[1].index_add_(0, y, torch.ones_like(hits))
    return counts


class ReferenceTrainer:
    """The state of one run: model, optimiser, data, schedule, history."""

    def __init__(self, params: Params, w: World):
        cfg = self.cfg = params.train_reference
        self.params, self.world = params, w
        self.real, self.val, self.test = (ArrayStore.open(path) for path in (layout.REAL_TRAIN, layout.REAL_VAL,
                                                                             layout.REAL_TEST))
        for store in (self.real, self.val, self.test):
            if len(store) == 0:
                raise DataError(f"{store.path} is empty: the reference classifier trains on data/real/train, selects "
                                "its checkpoint on data/real/val (data.val_size) and is scored on data/real/test")
        self.sampler = MixedBatchSampler(len(self.real), np.empty(0, np.int64), batch_size=cfg.batch_size,
                                         fraction=0.0, seed=params.base.seed)
        self.total_steps = cfg.epochs * self.sampler.steps_per_epoch
        dataset = self.real.meta.source.get("dataset", "")
        mean, std = normalisation(self.real)
        self.model_config = {"name": cfg.model, "num_classes": len(self.real.classes), "mean": mean, "std": std,
                             "dataset": dataset, "input_shape": list(self.real.image_shape)}
        self.model = build_classifier(cfg.model, num_classes=len(self.real.classes), mean=mean, std=std).to(w.device)
        self.optimizer = torch.optim.SGD(param_groups_without_bn_decay(self.model, cfg.weight_decay), lr=cfg.lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        # Set by use(), once the precision is chosen; a resumed run brings its recorded choice and loss scale.
        self.trained, self.scaler, self.precision = None, None, None
        self.recorded_precision, self.recorded_scaler = None, None
        self.augment = augmentation_for(dataset) if cfg.augment else None
        self.fingerprint = fingerprint(as_dict(cfg), params.base.seed, self.real.digest, self.val.digest)
        self.epoch, self.history, self.run_id = 0, [], None

    def resume(self) -> bool:
        """Load the work directory's last.pt if it belongs to this configuration and these inputs."""
        state = load_resumable(WORK / layout.REFERENCE_LAST.name, format=layout.REFERENCE_FORMAT,
                               fingerprint=self.fingerprint, map_location=self.world.device)
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history, self.run_id = state["epoch"], state["history"], state["mlflow_run_id"]
        self.recorded_precision, self.recorded_scaler = state.get("precision"), state.get("grad_scaler")
        return True

    def probe_passes(self):
        """Forward and backward passes of this network at this rank's micro-batch, for the `auto` probe."""
        return classifier_probe_passes(self.model, self.cfg.batch_size, self.real.image_shape, self.world,
                                       self.cfg.micro_batch)

    def workload(self) -> dict:
        """What the probe measures, for the machine's kept precision decision."""
        batch = probe_batch(self.cfg.batch_size, self.cfg.micro_batch, self.world)  # as probe_passes
        return {"stage": STAGE, "network": self.cfg.model, "batch": batch,
                "image_shape": list(self.real.image_shape), "classes": len(self.real.classes)}

    def use(self, decision: Decision) -> None:
        """Train from now on in `decision`'s setting (scoring stays float32: it calls the model directly)."""
        self.precision = decision
        self.trained, self.scaler = training_network(self.model, decision, self.world, compile=self.params.base.compile,
                                                     scaler_state=self.recorded_scaler)

    def checkpoint_state(self, *, with_optimizer: bool) -> dict[str, Any]:
        state = {"format": layout.REFERENCE_FORMAT, "fingerprint": self.fingerprint, "epoch": self.epoch,
                 "model": self.model.state_dict(), "model_config": self.model_config,
                 "classes": list(self.real.classes), "mlflow_run_id": self.run_id, "history": self.history,
                 "train_config": as_dict(self.cfg), "precision": self.precision.record()}
        if with_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def train_epoch(self, progress: tqdm) -> dict[str, float]:
        cfg, w = self.cfg, self.world
        self.model.train()
        generator = seeded_generator(self.params.base.seed, w.rank, self.epoch)
        totals = torch.zeros(3, dtype=torch.float64, device=w.device)  # loss·n, correct, n: read once per epoch
        for step, plan in enumerate(self.sampler.epoch(self.epoch, rank=w.rank, world_size=w.size)):
            images, labels = self.real.read(plan.real)
            x, y = to_unit_tensor(images, w.device), to_device(labels, w.device)
            if self.augment is not None:
                x = self.augment(x, generator=generator)
            lr = one_cycle_lr(self.epoch * self.sampler.steps_per_epoch + step, self.total_steps, cfg.lr,
                              cfg.warmup_fraction)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, correct = train_step(self.trained, self.optimizer, x, y, label_smoothing=cfg.label_smoothing,
                                       scaler=self.scaler, micro_batch=cfg.micro_batch)
            totals += torch.stack([loss.double() * len(y), correct.double(), totals.new_tensor(len(y))])
            progress.update(1)
        loss_sum, correct, n = all_reduce_sum(w, totals).tolist()
        return {"train_loss": loss_sum / n, "train_acc": correct / n, "lr": lr}

    def accuracy(self, store: ArrayStore, limit: int | None = None) -> Tensor:
        """(2, K) per-class correct and image counts of the model on the first `limit` images of `store`
        (all when None), each rank scoring its share with rank 0's BatchNorm statistics."""
        n = len(store) if limit is None else min(limit, len(store))
        rows = np.array_split(np.arange(n), self.world.size)[self.world.rank]
        broadcast_buffers(self.world, self.model)
        return all_reduce_sum(self.world, correct_per_class(self.model.eval(), store, rows, self.world.device))


def run(params: Params) -> dict:
    device = apply_torch(params.base)
    if params.train_reference.model not in CLASSIFIERS:
        raise ParamsError(f"train_reference.model = {params.train_reference.model!r} is not allowed: expected one "
                          f"of {', '.join(CLASSIFIERS)}")
    check_precision(params.base, device)
    with world(device) as w:
        trainer = ReferenceTrainer(params, w)
        trainer.resume()
        trainer.use(choose_setting(params.base, w, trainer.probe_passes, trainer.recorded_precision,
                                    workload=trainer.workload()))
        with stage_run(STAGE, params, SECTIONS, resume_run_id=trainer.run_id, enabled=w.is_main) as tracked:
            trainer.run_id = broadcast_object(w, tracked.run_id)
            if not tracked.continued:
                tracked.log_store(trainer.real, "real/train", context="training")
                tracked.log_store(trainer.val, "real/val", context="validation")
                tracked.log_params({"model.parameters": sum(p.numel() for p in trainer.model.parameters()),
                                    "steps_per_epoch": trainer.sampler.steps_per_epoch,
                                    "total_steps": trainer.total_steps})
                log_precision(tracked, trainer.precision)
            _train(trainer, tracked)
            return _finish(trainer, tracked)


def _train(trainer: ReferenceTrainer, tracked) -> None:
    w, cfg = trainer.world, trainer.cfg
    with tqdm(total=trainer.total_steps, initial=trainer.epoch * trainer.sampler.steps_per_epoch, desc=STAGE,
              unit="step", disable=not w.is_main, mininterval=2) as progress:
        while trainer.epoch < cfg.epochs:
            started = time.perf_counter()
            row = {"epoch": trainer.epoch + 1, **trainer.train_epoch(progress)}
            correct, count = trainer.accuracy(trainer.val, cfg.val_limit).sum(1).tolist()
            row |= {"val_acc": correct / count, "epoch_s": time.perf_counter() - started}
            best = max((r["val_acc"] for r in trainer.history), default=-1.0)
            trainer.history.append(row)
            trainer.epoch += 1
            if w.is_main:
                if row["val_acc"] > best:  # best before last: a kill in between redoes the epoch
                    save_checkpoint(WORK / layout.REFERENCE_BEST.name, trainer.checkpoint_state(with_optimizer=False))
                save_checkpoint(WORK / layout.REFERENCE_LAST.name, trainer.checkpoint_state(with_optimizer=True))
                tracked.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=trainer.epoch)
                progress.write(f"epoch {trainer.epoch}/{cfg.epochs}: train acc {row['train_acc']:.3f}, "
                               f"val acc {row['val_acc']:.3f} ({row['epoch_s']:.0f}s)")


def _write_curves(history: list[dict]) -> None:
    with atomic_path(layout.REFERENCE_CURVES) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} for row in history)


def _finish(trainer: ReferenceTrainer, tracked) -> dict:
    """The best checkpoint's clean accuracy on all of data/real/test: the headline, with its interval."""
    w = trainer.world
    best = max(trainer.history, key=lambda r: r["val_acc"])
    barrier(w)  # rank 0 wrote the best weights: every rank scores exactly those
    trainer.model.load_state_dict(load_checkpoint(WORK / layout.REFERENCE_BEST.name, map_location=w.device)["model"])
    test = trainer.test
    correct, count = trainer.accuracy(test)
    n, hits = int(count.sum()), int(correct.sum())
    low, high = wilson_interval(hits, n)
    metrics = {"test_acc": hits / n, "test_acc_low": low, "test_acc_high": high, "n_test": n,
               "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "epochs": trainer.epoch,
               "last_train_acc": trainer.history[-1]["train_acc"],
               "train_s": sum(r["epoch_s"] for r in trainer.history)}
    if w.is_main:
        per_class = (correct / count.clamp(min=1)).tolist()
        _write_curves(trainer.history)  # here, not per epoch: a run resumed after its last epoch writes it too
        write_json(layout.metrics_file(STAGE), {f"reference_{k}": metrics[k] for k in HEADLINE})
        write_json(layout.report_file(STAGE), {
            **metrics, **trainer.precision.summary(), "processes": w.size, "model": trainer.cfg.model,
            "test_sha256": test.digest, "test_acc_per_class": dict(zip(test.classes, per_class, strict=True)),
            "history": trainer.history})
        tracked.log_store(test, "real/test", context="evaluation")
        tracked.log_metrics({k: v for k, v in metrics.items() if k not in ("epochs", "best_epoch")})
        tracked.log_artifact(layout.REFERENCE_CURVES)
        tracked.log_artifact(layout.report_file(STAGE))
    barrier(w)  # every rank has read the best weights from the work directory
    if w.is_main:
        publish(WORK, layout.REFERENCE_DIR, (layout.REFERENCE_BEST.name, layout.REFERENCE_LAST.name))
    return metrics
