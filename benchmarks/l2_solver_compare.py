"""The L2 inner solver, measured: a short L2 TRADES run on CIFAR-10 (CPU) with the TRADES of whichever dmat is
on PYTHONPATH, then clean and PGD-20 L2 accuracy (eps 0.5) on 200 held-out training images; `report`
compares two runs point by point (Wilson intervals, exact McNemar on the same 200 images).

  python -m benchmarks.l2_solver_compare prepare data.npz    # 2000 train + 200 val images, seeded, stratified
  # before the fix (plain PGD-L2 at the Linf default step 2/255), from a checkout of 66cf0b5:
  PYTHONPATH=<66cf0b5>/src python -m benchmarks.l2_solver_compare train data.npz 0.00784313725490196 old.json
  # the reference's inner solver (step derived from eps):
  python -m benchmarks.l2_solver_compare train data.npz derived new.json
  python -m benchmarks.l2_solver_compare report old.json new.json

WRN-16-1, 6 epochs of batch 64, TRADES beta 5, 10 inner steps. Hours on 2 shared cores (see the README).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dmat.core.attacks import pgd
from dmat.core.classifiers import DATASET_STATS, build_classifier
from dmat.core.losses import one_cycle_lr, param_groups_without_bn_decay, trades_loss
from dmat.data.augment import random_crop_flip

ARCHIVE = "/work/shared/data/cifar10-jpeg.tar.gz"
N_TRAIN, N_VAL, SEED = 2000, 200, 0
EPS, STEPS, EPOCHS, BATCH, LR, BETA = 0.5, 10, 6, 64, 0.1, 5.0


def prepare(out: str) -> None:
    from dmat.data.sources import open_source
    from dmat.data.splits import purpose_rng, stratified_sample

    train = open_source("imagefolder", ARCHIVE, name="cifar10")["train"]
    chosen = stratified_sample(train.labels, N_TRAIN + N_VAL, purpose_rng(SEED, "l2-compare"))
    val = np.sort(stratified_sample(train.labels[chosen], N_VAL, purpose_rng(SEED, "l2-compare-val")))
    is_val = np.zeros(len(chosen), bool)
    is_val[val] = True
    images = np.stack([img for _, img in train.read(chosen)])
    np.savez(out, x_train=images[~is_val], y_train=train.labels[chosen][~is_val],
             x_val=images[is_val], y_val=train.labels[chosen][is_val])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).contiguous()


def train(data: str, step: str, result: str) -> None:
    torch.manual_seed(SEED)
    arrays = np.load(data)
    x_train, y_train = to_tensor(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    x_val, y_val = to_tensor(arrays["x_val"]), torch.from_numpy(arrays["y_val"])
    mean, std = DATASET_STATS["cifar10"]
    model = build_classifier("wrn-16-1", num_classes=10, mean=mean, std=std)
    optimizer = torch.optim.SGD(param_groups_without_bn_decay(model, 5e-4), lr=LR, momentum=0.9, nesterov=True)
    step_size = None if step == "derived" else float(step)
    generator = torch.Generator().manual_seed(SEED)
    steps_per_epoch = -(-len(x_train) // BATCH)
    total, started = EPOCHS * steps_per_epoch, time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(steps_per_epoch):
            rows = order[i * BATCH:(i + 1) * BATCH]
            x, y = random_crop_flip(x_train[rows], generator=generator), y_train[rows]
            for group in optimizer.param_groups:
                group["lr"] = one_cycle_lr(epoch * steps_per_epoch + i, total, LR)
            loss, stats = trades_loss(model, x, y, beta=BETA, norm="L2", eps=EPS, step_size=step_size, steps=STEPS,
                                      generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: loss {float(stats['loss']):.3f} adv_acc {float(stats['adv_acc']):.3f} "
              f"({time.perf_counter() - started:.0f}s)", flush=True)
    model.eval()
    eval_gen = torch.Generator().manual_seed(123)
    x_adv = pgd(model, x_val, y_val, norm="L2", eps=EPS, step_size=2.5 * EPS / 20, steps=20, loss="ce",
                generator=eval_gen)
    with torch.no_grad():
        clean = (model(x_val).argmax(1) == y_val)
        robust = (model(x_adv).argmax(1) == y_val)
    out = {"step": step, "n": len(y_val), "clean_correct": int(clean.sum()), "robust_correct": int(robust.sum()),
           "clean_outcomes": clean.int().tolist(), "robust_outcomes": robust.int().tolist(),
           "train_s": time.perf_counter() - started}
    with open(result, "w") as f:
        json.dump(out, f)
    print({k: v for k, v in out.items() if not k.endswith("outcomes")})


def report(before: str, after: str) -> None:
    from dmat.core.stats import mcnemar_exact, wilson_interval

    runs = [json.loads(Path(path).read_text()) for path in (before, after)]
    for run in runs:
        for kind in ("clean", "robust"):
            low, high = wilson_interval(run[f"{kind}_correct"], run["n"])
            print(f"step {run['step']}: {kind} {run[f'{kind}_correct']}/{run['n']} [{low:.3f}, {high:.3f}]")
    for kind in ("clean", "robust"):
        test = mcnemar_exact(*(np.asarray(run[f"{kind}_outcomes"], bool) for run in runs))
        print(f"{kind}: exact McNemar on the same {runs[0]['n']} images: {test}")


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare(sys.argv[2])
    elif sys.argv[1] == "report":
        report(*sys.argv[2:4])
    else:
        train(*sys.argv[2:5])
