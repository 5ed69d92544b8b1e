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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmat import pipeline
from dmat.artifacts import layout
from dmat.artifacts.records import ReferenceHeader
from dmat.checkpoint import fingerprint, load_checkpoint
from dmat.config import Params, as_dict
from dmat.core.accumulation import accumulate_gradients, deferred_sync
from dmat.core.classifiers import CLASSIFIERS
from dmat.core.precision import full_precision
from dmat.core.stats import wilson_interval
from dmat.data.store import ArrayStore
from dmat.data.tensors import to_device, to_unit_tensor
from dmat.distributed import World, all_reduce_sum, barrier, broadcast_buffers
from dmat.errors import DataError
from dmat.training.classifier import ClassifierTraining

DECLARED = pipeline.for_module(__name__)
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


class ReferenceTrainer(ClassifierTraining):
    """Standard training of the reference classifier (model, optimiser) on real data; the best epoch by clean
    accuracy on data/real/val is kept."""

    DECLARED = DECLARED
    SECTION = "train_reference"
    NETWORKS = CLASSIFIERS
    FORMAT = layout.REFERENCE_FORMAT
    HEADER = ReferenceHeader
    CHECKPOINTS = (layout.REFERENCE_BEST, layout.REFERENCE_LAST)
    SELECT_BY = "val_acc"
    CURVES = layout.REFERENCE_CURVES
    TRAIN_FIGURES = ("train_acc",)

    def __init__(self, params: Params, w: World):
        real, val, self.test = (ArrayStore.open(path) for path in (layout.REAL_TRAIN, layout.REAL_VAL,
                                                                   layout.REAL_TEST))
        for store in (real, val, self.test):
            if len(store) == 0:
                raise DataError(f"{store.path} is empty: the reference classifier trains on data/real/train, selects "
                                "its checkpoint on data/real/val (data.val_size) and is scored on data/real/test")
        super().__init__(params, w, real, val, rows=np.empty(0, np.int64), fraction=0.0)
        self.fingerprint = fingerprint(as_dict(self.cfg), params.base.seed, self.real.digest, self.val.digest)

    def log_inputs(self, tracked) -> None:
        super().log_inputs(tracked)
        tracked.log_params({"model.parameters": sum(p.numel() for p in self.model.parameters()),
                            "steps_per_epoch": self.sampler.steps_per_epoch, "total_steps": self.total_steps})

    def step(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        loss, correct = train_step(self.trained, self.optimizer, x, y, label_smoothing=self.cfg.label_smoothing,
                                   scaler=self.scaler, micro_batch=self.cfg.micro_batch)
        return torch.stack([loss.double() * len(y), correct.double(),
                            torch.tensor(len(y), dtype=torch.float64, device=y.device)])

    def validate(self) -> dict[str, float]:
        correct, count = self.accuracy(self.val, self.cfg.val_limit).sum(1).tolist()
        return {"val_acc": correct / count}

    def epoch_summary(self, row: dict[str, float]) -> str:
        return f"train acc {row['train_acc']:.3f}, val acc {row['val_acc']:.3f}"

    def accuracy(self, store: ArrayStore, limit: int | None = None) -> Tensor:
        """(2, K) per-class correct and image counts of the model on the first `limit` images of `store`
        (all when None), each rank scoring its share with rank 0's BatchNorm statistics."""
        n = len(store) if limit is None else min(limit, len(store))
        rows = np.array_split(np.arange(n), self.world.size)[self.world.rank]
        broadcast_buffers(self.world, self.model)
        return all_reduce_sum(self.world, correct_per_class(self.model.eval(), store, rows, self.world.device))

    def finish(self, tracked) -> dict:
        """The best checkpoint's clean accuracy on all of data/real/test: the headline, with its interval."""
        w, test = self.world, self.test
        best = self.best_epoch()
        barrier(w)  # rank 0 wrote the best weights: every rank scores exactly those
        self.model.load_state_dict(load_checkpoint(self.work / layout.REFERENCE_BEST.name,
                                                   map_location=w.device)["model"])
        correct, count = self.accuracy(test)
        n, hits = int(count.sum()), int(correct.sum())
        low, high = wilson_interval(hits, n)
        metrics = {"test_acc": hits / n, "test_acc_low": low, "test_acc_high": high, "n_test": n,
                   "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "epochs": self.epoch,
                   "last_train_acc": self.history[-1]["train_acc"],
                   "train_s": sum(r["epoch_s"] for r in self.history)}
        if w.is_main:
            per_class = (correct / count.clamp(min=1)).tolist()
            self.write_curves()
            self.write_results(metrics, {f"reference_{k}": metrics[k] for k in HEADLINE}, model=self.cfg.model,
                               test_sha256=test.digest,
                               test_acc_per_class=dict(zip(test.classes, per_class, strict=True)),
                               history=self.history)
            tracked.log_store(test, "real/test", context="evaluation")
            tracked.log_metrics({k: v for k, v in metrics.items() if k not in ("epochs", "best_epoch")})
            tracked.log_artifact(self.CURVES)
            tracked.log_artifact(layout.report_file(self.DECLARED.name))
        return metrics


def run(params: Params) -> dict:
    return ReferenceTrainer.run(params)
