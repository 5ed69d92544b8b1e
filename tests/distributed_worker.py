"""Run under torchrun (gloo, 3 processes) by test_distributed_gpu_paths.py: checks of the multi-process code
paths, each rank's findings gathered to rank 0, which saves them to the file named on the command line.

- uneven: train_diffusion's interval metrics when ranks hold different numbers of rows
- seeding: dropout masks and weights on each rank after `training_network` (as every training stage)
- buffers: BatchNorm buffers after each rank trained on its own batch, then `broadcast_buffers`
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from dmat.config import BaseConfig
from dmat.core.precision import Decision, Setting
from dmat.distributed import all_gather_object, broadcast_buffers, world
from dmat.stage_setup import apply_torch, training_network
from dmat.stages.train_diffusion import _reduce_interval
from tests.conftest import tiny_bn_net

GLOBAL_BATCH = 8  # on 3 processes: shares of 3, 3 and 2 rows


def interval_rows(n: int) -> torch.Tensor:
    """Per-sample [σ, loss, denoise loss, regulariser] rows of a global batch, as train_step returns them."""
    rows = torch.rand(n, 4, generator=torch.Generator().manual_seed(1)) + 0.1
    rows[::2, 3] = float("nan")  # samples that `fraction` leaves out of the regulariser
    return rows


def uneven(w) -> dict:
    rows = interval_rows(GLOBAL_BATCH)
    share = np.array_split(np.arange(GLOBAL_BATCH), w.size)[w.rank]  # as MixedBatchSampler cuts a batch
    return {"rows": len(share), "metrics": _reduce_interval(w, rows[share], 1.0, GLOBAL_BATCH)}


def seeding(w) -> dict:
    model = tiny_bn_net(4, 3)  # built before the ranks part ways: the same weights on every rank
    network, _ = training_network(model, Decision(Setting(), "requested"), w, compile=False)
    mask = F.dropout(torch.ones(256), 0.5, training=True) != 0  # what DDPM++ dropout draws from
    return {"mask": mask.tolist(), "numpy": float(np.random.rand()),
            "weights": [p.detach().sum().item() for p in model.parameters()]}


def buffers(w) -> dict:
    model = tiny_bn_net(4, 3).train()
    with torch.no_grad():
        model(torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(10 + w.rank)))  # rank-local statistics
    before = [b.tolist() for b in model.buffers()]
    broadcast_buffers(w, model)
    return {"before": before, "after": [b.tolist() for b in model.buffers()]}


CHECKS = {"uneven": uneven, "seeding": seeding, "buffers": buffers}


def main(out: str) -> None:
    torch.set_num_threads(1)
    device = apply_torch(BaseConfig(seed=0, device="cpu"))
    with world(device) as w:
        found = {name: all_gather_object(w, check(w)) for name, check in CHECKS.items()}
    if w.is_main:
        torch.save(found, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
