"""`train`: adversarial training of the classifier on mixed real/generated batches (docs/method.md).

TRADES (or PGD-AT) with SGD + Nesterov, weight decay except on BatchNorm, a one-cycle learning
rate, and weight averaging (EMA). After every epoch the EMA model is scored on data/real/val
(clean accuracy and PGD-CW accuracy, eval mode) and the best by robust accuracy is kept.

Writes models/classifier/{last,best}.pt, metrics/train.json and plots/train_curves.csv. While it
trains, both checkpoints are written atomically after every epoch into the stage's work directory
(`layout.work_dir`); re-running after a kill resumes from there, provided they belong to the same
configuration and inputs, and the finished ones move to models/classifier. Under torchrun (`base.nproc`)
each process trains on its share of every global batch (DDP), in micro-batches of at most
`train.micro_batch` images whose gradients accumulate before each optimiser step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dmat import pipeline
from dmat.artifacts import layout
from dmat.artifacts.loaders import load_classifier, load_mix_manifest, open_mixed_store
from dmat.artifacts.records import ClassifierHeader, Threat
from dmat.checkpoint import fingerprint
from dmat.config import Params, as_dict
from dmat.core.accumulation import accumulate_gradients, deferred_sync
from dmat.core.attacks import default_step_size, pgd
from dmat.core.classifiers import CLASSIFIERS
from dmat.core.ema import WeightAverage, trades_ema_decay
from dmat.core.losses import pgd_at_loss, trades_loss
from dmat.core.precision import full_precision
from dmat.core.rng import seeded_generator
from dmat.data.store import ArrayStore
from dmat.data.tensors import to_device, to_unit_tensor
from dmat.distributed import World, all_reduce_sum, broadcast_buffers
from dmat.training.classifier import ClassifierTraining

DECLARED = pipeline.for_module(__name__)
EVAL_BATCH = 256
POSTFIX_EVERY = 50  # steps between progress-bar loss updates (each reads the device: a host sync)


class Trainer(ClassifierTraining):
    """Adversarial training of the classifier (model, EMA, optimiser) on the mix; the best epoch by robust
    accuracy on data/real/val is kept."""

    DECLARED = DECLARED
    SECTION = "train"
    NETWORKS = CLASSIFIERS
    FORMAT = layout.CLASSIFIER_FORMAT
    HEADER = ClassifierHeader
    CHECKPOINTS = (layout.CLASSIFIER_BEST, layout.CLASSIFIER_LAST)
    SELECT_BY = "val_robust_acc"
    CURVES = layout.TRAIN_CURVES
    CURVES_EACH_EPOCH = True  # a long run's curves, readable while it trains
    TRAIN_FIGURES = ("train_clean_acc", "train_adv_acc")

    def __init__(self, params: Params, w: World):
        real, val = ArrayStore.open(layout.REAL_TRAIN), ArrayStore.open(layout.REAL_VAL)
        self.manifest, rows = load_mix_manifest()
        self.fraction = self.manifest.synthetic_fraction
        synthetic = open_mixed_store(self.manifest) if self.fraction > 0 else None  # the store the mix names
        super().__init__(params, w, real, val, synthetic=synthetic, rows=rows, fraction=self.fraction)
        self.ema = WeightAverage(self.model)
        self.fingerprint = fingerprint(as_dict(self.cfg), params.base.seed, self.real.digest, self.val.digest,
                                       self.manifest.synthetic.sha256, self.manifest.indices_sha256,
                                       self.fraction)

    def record(self) -> dict:
        return {"threat": Threat(norm=self.cfg.attack.norm, eps=self.cfg.attack.eps)}

    # --- one epoch ---------------------------------------------------------------------------------------

    def step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One optimiser step on this rank's batch, in micro-batches of at most `train.micro_batch` images.

        Returns float64 [loss·n, clean correct, adversarial correct, n] on the device (no host sync)."""
        cfg = self.cfg
        loss_fn = trades_loss if cfg.loss == "trades" else pgd_at_loss
        # PGD-AT trains on plain CE, as the reference; label smoothing is TRADES' clean term only
        extra = {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing} if cfg.loss == "trades" else {}

        def loss_of(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
            loss, stats = loss_fn(self.trained, x[part], y[part], norm=cfg.attack.norm, eps=cfg.attack.eps,
                                  step_size=cfg.attack.step_size, steps=cfg.attack.steps, generator=generator, **extra)
            n = part.stop - part.start
            sums = torch.stack([stats["loss"], stats["clean_acc"], stats["adv_acc"]]).double() * n
            return loss, torch.cat([sums, sums.new_tensor([n])])

        self.optimizer.zero_grad(set_to_none=True)
        parts = accumulate_gradients(len(y), cfg.micro_batch, loss_of, lambda loss: self.scaler.scale(loss).backward(),
                                     no_sync=deferred_sync(self.trained))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return sum(totals for _, totals in parts)

    def after_step(self, global_step: int) -> None:
        cfg = self.cfg
        self.ema.update(self.model, trades_ema_decay(global_step + 1, self.total_steps, cfg.ema_tau,
                                                     cfg.warmup_fraction))

    def show_progress(self, step: int, totals: torch.Tensor, progress: tqdm) -> None:
        if step % POSTFIX_EVERY == 0:
            loss_sum, clean, adv, n = totals.tolist()
            progress.set_postfix(loss=f"{loss_sum / n:.3f}", adv_acc=f"{adv / n:.2f}")

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
        broadcast_buffers(w, model)  # BatchNorm statistics are each rank's own: every rank scores rank 0's EMA
        generator = seeded_generator(self.params.base.seed, w.rank)
        counts = torch.zeros(3, dtype=torch.float64, device=w.device)  # clean correct, robust correct, n
        for start in range(0, len(rows), EVAL_BATCH):
            images, labels = self.val.read(rows[start:start + EVAL_BATCH])
            x, y = to_unit_tensor(images, w.device), to_device(labels, w.device)
            x_adv = pgd(model, x, y, norm=cfg.attack.norm, eps=cfg.attack.eps, loss="cw", generator=generator,
                        step_size=2.5 * cfg.attack.eps / cfg.val_attack_steps, steps=cfg.val_attack_steps)
            with torch.no_grad():
                counts += torch.stack([(model(x).argmax(1) == y).sum(), (model(x_adv).argmax(1) == y).sum(),
                                       y.new_tensor(len(y))]).double()
        clean, robust, count = all_reduce_sum(w, counts).tolist()
        return {"val_clean_acc": clean / max(count, 1), "val_robust_acc": robust / max(count, 1)}

    def epoch_summary(self, row: dict[str, float]) -> str:
        return f"val clean {row['val_clean_acc']:.3f} robust {row['val_robust_acc']:.3f}"

    def log_inputs(self, tracked) -> None:
        super().log_inputs(tracked)
        synthetic, attack = self.manifest.synthetic, self.cfg.attack
        tracked.log_dataset("synthetic", str(Path(synthetic.path).resolve()), synthetic.sha256, context="training",
                            used=synthetic.used, fraction=self.fraction)
        tracked.log_params({"mix.synthetic_fraction": self.fraction, "mix.synthetic_used": synthetic.used,
                            "mix.synthetic_sha256": synthetic.sha256, "model.num_classes": len(self.real.classes),
                            "steps_per_epoch": self.sampler.steps_per_epoch, "total_steps": self.total_steps,
                            "attack.step_size_used": attack.step_size or default_step_size(attack.norm, attack.eps,
                                                                                           attack.steps)})

    def finish(self, tracked) -> dict:
        best, last = self.best_epoch(), self.history[-1]
        metrics = {
            "epochs": self.epoch, "steps": self.total_steps, "best_epoch": best["epoch"],
            "best_val_clean_acc": best["val_clean_acc"], "best_val_robust_acc": best["val_robust_acc"],
            "last_val_clean_acc": last["val_clean_acc"], "last_val_robust_acc": last["val_robust_acc"],
            "train_s": sum(r["epoch_s"] for r in self.history), **self.precision.headline(),
        }
        if self.world.is_main:
            self.write_results(metrics, {("train_" + k if k in ("epochs", "steps") else k): v
                                         for k, v in metrics.items()})
            tracked.log_metrics({k: v for k, v in metrics.items()
                                 if isinstance(v, int | float) and k not in ("epochs", "steps")})
            self.write_curves()
            tracked.log_artifact(self.CURVES)
            best_model, _ = load_classifier(self.work / layout.CLASSIFIER_BEST.name)
            example = np.zeros((2, *[self.real.image_shape[i] for i in (2, 0, 1)]), dtype=np.float32)
            tracked.log_torch_model(best_model, input_example=example)
        return metrics


def run(params: Params) -> dict:
    return Trainer.run(params)
