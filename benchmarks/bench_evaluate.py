"""AutoAttack cost: the evaluation library against a bare pyautoattack call, and images/s for the CPU default model.

Same model (the CPU default wrn-16-1, freshly initialised and put in eval mode: the cost of an attack
does not depend on the weights' quality, only on how many points survive each attack; a trained
checkpoint at models/classifier/best.pt is used when present), same points, same seed. The overhead
ratio compares `dmat.core.robustness.run_autoattack` (contract checks, log capture, re-check of the
returned examples) with `AutoAttack(...).run_standard_evaluation` alone. Version custom with
APGD-CE + APGD-T keeps one run within a minute on 2 cores; images/s is per evaluated point. The two
sides run interleaved, twice each, and the best time of each side is compared.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dmat.core.classifiers import DATASET_STATS, build_classifier
from dmat.core.robustness import run_autoattack

N, BATCH, SEED, EPS = 32, 32, 0, 8 / 255
ROUNDS = 2  # interleaved; the best of each side counts (the machine is shared)
ATTACKS = ["apgd-ce", "apgd-t"]
CHECKPOINT = Path("models/classifier/best.pt")


def cpu_default_model() -> tuple[torch.nn.Module, str]:
    if CHECKPOINT.is_file():
        from dmat.artifacts.loaders import load_classifier

        return load_classifier(CHECKPOINT)[0], str(CHECKPOINT)
    mean, std = DATASET_STATS["cifar10"]
    return build_classifier("wrn-16-1", num_classes=10, mean=mean, std=std).eval(), "wrn-16-1 (untrained)"


def bare(model, x, y) -> float:
    import pyautoattack

    started = time.perf_counter()
    adversary = pyautoattack.AutoAttack(model, attacks=ATTACKS, device="cpu", eps=EPS, norm="Linf", seed=SEED,
                                        version="custom")
    adversary.run_standard_evaluation(x, y, batch_size=BATCH)
    return time.perf_counter() - started


def ours(model, x, y) -> float:
    started = time.perf_counter()
    run_autoattack(model, x, y, norm="Linf", eps=EPS, version="custom", attacks=ATTACKS, seed=SEED, batch_size=BATCH)
    return time.perf_counter() - started


def run() -> dict:
    model, source = cpu_default_model()
    generator = torch.Generator().manual_seed(SEED)
    x, y = torch.rand(N, 3, 32, 32, generator=generator), torch.randint(0, 10, (N,), generator=generator)
    test = Path("data/real/test")
    if test.is_dir():  # real points: as many survive each attack as in the stage
        from dmat.data.store import ArrayStore
        from dmat.data.tensors import first_points

        x, y = first_points(ArrayStore.open(test), N)
    bare_times, our_times = [], []
    for _ in range(ROUNDS):
        bare_times.append(bare(model, x, y))
        our_times.append(ours(model, x, y))
    bare_s, ours_s = min(bare_times), min(our_times)
    return {"model": source, "n": N, "attacks": ATTACKS, "bare_pyautoattack_s": bare_s, "dmat_run_autoattack_s": ours_s,
            "overhead_ratio": ours_s / bare_s, "images_per_s": N / ours_s,
            "all_bare_s": bare_times, "all_dmat_s": our_times}
