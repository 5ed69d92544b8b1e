"""The multi-process paths that GPUs take, shown with gloo processes on the CPU: shares of different sizes,
ranks that draw their own dropout masks, one set of BatchNorm statistics for scoring, collectives that refuse
tensors off the world's device, and a world of one that stays exactly as it was."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from dmat.core.precision import Decision, Setting
from dmat.distributed import World, all_gather_rows, all_reduce_sum, broadcast_buffers
from dmat.stage_setup import training_network
from dmat.stages.train_diffusion import interval_metrics
from tests.conftest import REPO_ROOT, run_torchrun, tiny_bn_net
from tests.distributed_worker import GLOBAL_BATCH, interval_rows


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Every check of tests/distributed_worker.py, run once by 3 gloo processes: per check, each rank's findings."""
    out = tmp_path_factory.mktemp("distributed") / "found.pt"
    result = run_torchrun(str(out), cwd=REPO_ROOT, nproc=3, module="tests.distributed_worker")
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow  # three torchrun processes
def test_interval_metrics_gather_shares_of_different_sizes_on_three_processes(ranks: dict) -> None:
    """A global batch of 8 on 3 processes is 3 + 3 + 2 rows: the gathered metrics are the single process's."""
    ranks = ranks["uneven"]
    assert [r["rows"] for r in ranks] == [3, 3, 2]
    expected = interval_metrics(interval_rows(GLOBAL_BATCH), 1.0, GLOBAL_BATCH)
    for found in ranks:
        assert found["metrics"].keys() == expected.keys()
        for key, value in expected.items():
            assert math.isclose(found["metrics"][key], value, rel_tol=1e-12), key


@pytest.mark.slow  # three torchrun processes
def test_ranks_draw_their_own_dropout_masks_from_the_same_weights(ranks: dict) -> None:
    first, *others = ranks["seeding"]
    assert all(other["weights"] == first["weights"] for other in others)  # built before the generators part ways
    masks, draws = [r["mask"] for r in ranks["seeding"]], [r["numpy"] for r in ranks["seeding"]]
    assert len({tuple(m) for m in masks}) == len(masks) and len(set(draws)) == len(draws)


@pytest.mark.slow  # three torchrun processes
def test_every_rank_scores_with_rank_zeros_batchnorm_statistics(ranks: dict) -> None:
    first, *others = ranks["buffers"]
    assert all(other["before"] != first["before"] for other in others)  # each rank's forward moved its own
    assert all(r["after"] == first["before"] for r in ranks["buffers"])


def test_a_world_of_one_keeps_its_generators() -> None:
    """Single-process runs stay bit-identical: `training_network` reseeds nothing at world size 1."""
    model = tiny_bn_net(4, 3)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    training_network(model, Decision(Setting(), "requested"), World(0, 1, "cpu"), compile=False)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


@pytest.mark.parametrize("collective", [
    lambda w: all_reduce_sum(w, torch.zeros(3)),
    lambda w: all_gather_rows(w, torch.zeros(2, 4)),
    lambda w: broadcast_buffers(w, tiny_bn_net(4, 3)),
], ids=["all_reduce_sum", "all_gather_rows", "broadcast_buffers"])
def test_collectives_refuse_tensors_off_the_worlds_device(collective) -> None:
    """NCCL refuses CPU tensors only when the collective runs (after an epoch of work): ours refuse at once."""
    gpu_world = World(0, 2, "cuda:0", joined=True)
    with pytest.raises(ValueError, match="collective got a tensor on cpu.*cuda:0"):
        collective(gpu_world)
