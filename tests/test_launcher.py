"""`base.nproc`: a stage that runs under torchrun starts torchrun itself, as `dvc repro` runs it (`dmat <stage>`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from dmat.checkpoint import load_checkpoint
from dmat.config import BaseConfig, ParamsError, parse_params
from dmat.distributed import processes, relaunch_under_torchrun, torchrun_command
from tests.conftest import make_image_folder, run_dmat, write_params

PARAMS = """
base: {{seed: 0, device: cpu, nproc: {nproc}, precision: fp32, memory_format: contiguous}}
data: {{name: tiny, path: {folder}, val_size: 6, train_limit: null, test_limit: null, heldout_size: 0}}
train_reference: {{epochs: 1, batch_size: 8, micro_batch: 2}}
train_diffusion: {{steps: 2, batch_size: 8, micro_batch: 2, log_every: 1, checkpoint_every: 2, grid_steps: 2,
                  adversarial: {{mode: adversarial, fraction: 0.5}}}}
"""


def test_process_count_follows_base_nproc(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert processes(BaseConfig()) == 1  # the default: a plain process, no torchrun
    assert processes(BaseConfig(nproc=0)) == 1  # one per visible GPU, and there is none
    assert processes(BaseConfig(nproc=3, device="cpu")) == 3  # gloo processes on the CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert processes(BaseConfig(nproc=0)) == 4
    assert processes(BaseConfig(nproc=0, device="cpu")) == 1
    with pytest.raises(ParamsError, match="base.nproc = 8 is not allowed here: only 4 CUDA devices"):
        processes(BaseConfig(nproc=8))


def test_nproc_is_validated() -> None:
    with pytest.raises(ParamsError, match="base.nproc = -1 is not allowed: expected an integer between 0 and 1024"):
        parse_params({"base": {"nproc": -1}})


def test_torchrun_runs_this_interpreter_on_the_same_command() -> None:
    assert torchrun_command(4, ["evaluate", "--threat", "linf"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "dmat.cli",
        "evaluate", "--threat", "linf"]


def test_a_process_torchrun_started_runs_the_stage_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: relaunching again would nest torchruns
    relaunch_under_torchrun(BaseConfig(nproc=2, device="cpu"), ["train"])  # returns instead of exec'ing


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("launcher")
    folder = make_image_folder(workdir / "folder", {"train": 10, "test": 2}, size=8)
    write_params(workdir / "params.yaml", PARAMS.format(nproc=1, folder=folder))
    assert run_dmat("prepare", cwd=workdir).returncode == 0
    return workdir


def _workspace(prepared: Path, tmp_path: Path, nproc: int) -> Path:
    workdir = shutil.copytree(prepared, tmp_path / "work")
    write_params(workdir / "params.yaml", PARAMS.format(nproc=nproc, folder=prepared / "folder"))
    return workdir


@pytest.mark.slow
def test_train_diffusion_on_three_processes_with_uneven_shares_and_micro_batches(prepared: Path,
                                                                                  tmp_path: Path) -> None:
    """`dmat train-diffusion` with base.nproc 3: batches of 8 are shares of 3, 3 and 2 images, each in
    micro-batches of 2; the interval metrics gather them every step."""
    workdir = _workspace(prepared, tmp_path, nproc=3)
    result = run_dmat("train-diffusion", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node=3" in result.stderr
    assert load_checkpoint(workdir / "models/diffusion/checkpoint.pt")["step"] == 2
    report = json.loads((workdir / "reports/train_diffusion.json").read_text())
    assert report["processes"] == 3 and [entry["step"] for entry in report["log"]] == [1, 2]


@pytest.mark.slow
def test_train_reference_on_two_processes_with_micro_batches(prepared: Path, tmp_path: Path) -> None:
    workdir = _workspace(prepared, tmp_path, nproc=2)
    result = run_dmat("train-reference", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((workdir / "reports/train_reference.json").read_text())
    assert report["processes"] == 2 and report["n_test"] == 6
