"""slurm/multinode.sbatch on a real SLURM: two torchrun agents (as on two nodes; here both on the one node) meet
through c10d rendezvous and train the diffusion model with DDP over gloo, and the outputs are committed to dvc.lock.
On GPU nodes the same script starts one worker per GPU on each node (NCCL)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dmat.checkpoint import load_checkpoint
from tests.conftest import BIN_DIR, REPO_ROOT
from tests.e2e.test_pipeline import project_copy, run
from tests.slurm.conftest import wait_for_jobs

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.slurm]

TEMPLATE = REPO_ROOT / "slurm/multinode.sbatch"


def test_two_agents_train_the_diffusion_model_and_dvc_records_it(slurm: None, tiny_pipeline: Path,
                                                                 tmp_path: Path) -> None:
    project = project_copy(tiny_pipeline, tmp_path)
    shutil.rmtree(project / "models/diffusion")
    log = tmp_path / "multinode.out"
    # Two agents of one worker each on the one node: what --nodes=2 --ntasks-per-node=1 gives on a cluster.
    job = run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
               "--time=15", f"--output={log}", str(TEMPLATE), "train_diffusion"], project,
              env={"DMAT_NPROC_PER_NODE": "1", "LOGLEVEL": "INFO"}).stdout.strip()
    wait_for_jobs([job], timeout=900)
    text = log.read_text()
    state = subprocess.run(["scontrol", "--oneliner", "show", "job", job], capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in state, text[-3000:]
    assert "train-diffusion on 2 agent(s) x 1 worker(s)" in text
    # torchrun's own account (LOGLEVEL=INFO): c10d rendezvous, both agents in one group of two
    assert re.search(r"rdzv_backend\s*:\s*c10d", text) and re.search(r"min_nodes\s*:\s*2", text), text[-3000:]
    assert text.count("group_world_size=2") == 2 and "group_rank=0" in text and "group_rank=1" in text
    assert load_checkpoint(project / "models/diffusion/checkpoint.pt")["step"] == 4
    assert not (project / ".dmat/work/train_diffusion").exists()
    status = run([str(BIN_DIR / "dvc"), "status", "train_diffusion"], project).stdout
    assert "up to date" in status, status
