"""Run under torchrun by test_robustness.py: `evaluate_robustness` with the points sharded over the processes.

Every process trains the same small model (one thread, seeded) and evaluates its shard; rank 0 saves
the report and the adversarial examples to the file named on the command line.
"""

from __future__ import annotations

import functools
import sys

import torch

from dmat.core.robustness import Shard, evaluate_robustness
from dmat.distributed import all_gather_object, world
from tests.core.test_robustness import CLASSES, colour_data, settings, train_colour_model

# 40 points in batches of 16: rank 0 of 2 takes batches 0-1, rank 1 batch 2; the sweep's 20 points are all rank 0's.
SHARDED_SETTINGS = settings(attacks=("apgd-ce", "apgd-t"), batch_size=16, pgd_steps=3, sweep_n=20)


def main(out: str) -> None:
    torch.set_num_threads(1)
    model = train_colour_model(hidden=16, steps=60)
    x, y = colour_data(40, seed=2)
    with world("cpu") as w:
        report, x_adv = evaluate_robustness(model, x, y, CLASSES, SHARDED_SETTINGS,
                                            shard=Shard(w.rank, w.size, functools.partial(all_gather_object, w)))
    if w.is_main:
        torch.save({"report": report, "x_adv": x_adv, "processes": w.size}, out)


if __name__ == "__main__":
    main(sys.argv[1])
