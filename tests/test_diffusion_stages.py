"""`train-diffusion` and `generate` for real on tiny data: resume, determinism, DDP, MLflow record."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from dmat.checkpoint import load_checkpoint
from dmat.data.store import ArrayStore
from tests.conftest import BIN_DIR, make_image_folder, run_dmat, write_params

pytestmark = pytest.mark.slow

PARAMS = """
base: {{seed: 0}}
data: {{name: tiny, path: {folder}, val_size: 6}}
train_diffusion: {{steps: {steps}, batch_size: 8, log_every: 2, checkpoint_every: 2, grid_steps: 2,
                  adversarial: {{mode: {mode}}}}}
generate: {{per_class: 5, batch_size: {batch}, network_batch: 4, steps: 2}}
"""


def _params(workdir: Path, folder: Path, *, steps: int = 2, mode: str = "adversarial", batch: int = 64) -> None:
    write_params(workdir / "params.yaml", PARAMS.format(folder=folder, steps=steps, mode=mode, batch=batch))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/real and a 2-step diffusion checkpoint on 16×16 images of 3 classes."""
    workdir = tmp_path_factory.mktemp("diffusion")
    folder = make_image_folder(workdir / "folder", {"train": 10, "test": 2}, size=16)
    _params(workdir, folder)
    for stage in ("prepare", "train-diffusion"):
        result = run_dmat(stage, cwd=workdir)
        assert result.returncode == 0, result.stderr
    return workdir


def _copy(trained: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "work"
    shutil.copytree(trained, workdir)
    return workdir


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(BIN_DIR / "torchrun"), "--standalone", "--nproc_per_node=2", str(BIN_DIR / "dmat"),
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_train_diffusion_outputs_and_mlflow_record(trained: Path) -> None:
    state = load_checkpoint(trained / "models/diffusion/checkpoint.pt")
    assert state["step"] == 2 and state["adversarial"]["mode"] == "adversarial"
    assert {"model", "ema", "optimizer", "model_config", "classes"} <= set(state)
    metrics = json.loads((trained / "metrics/train_diffusion.json").read_text())
    assert metrics["steps"] == 2 and metrics["regulariser"] > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    run = client.get_run(state["mlflow_run_id"])
    assert run.data.params["train_diffusion.adversarial.mode"] == "adversarial"
    assert {"loss", "regulariser", "images_per_s"} <= set(run.data.metrics)
    assert "samples_grid.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_generate_is_identical_for_any_batch_size_and_process_count(trained: Path, tmp_path: Path) -> None:
    digests = {}
    for batch in (7, 64):
        workdir = _copy(trained, tmp_path / f"b{batch}")
        _params(workdir, workdir / "folder", batch=batch)
        result = run_dmat("generate", cwd=workdir)
        assert result.returncode == 0, result.stderr
        digests[f"batch {batch}"] = ArrayStore.open(workdir / "data/synthetic", verify=True).digest
    workdir = _copy(trained, tmp_path / "ddp")
    result = _torchrun("generate", cwd=workdir)
    assert result.returncode == 0, result.stderr
    digests["2 processes"] = ArrayStore.open(workdir / "data/synthetic", verify=True).digest
    assert len(set(digests.values())) == 1, digests
    store = ArrayStore.open(workdir / "data/synthetic")
    assert len(store) == 15 and np.array_equal(store.labels, np.repeat(np.arange(3), 5))  # sorted by class
    assert (workdir / "plots/generate_grid.png").is_file()


def test_train_diffusion_resumes_after_sigkill(trained: Path, tmp_path: Path) -> None:
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(workdir / "models/diffusion")
    _params(workdir, workdir / "folder", steps=30, mode="random")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen([str(BIN_DIR / "dmat"), "train-diffusion"], cwd=workdir, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = workdir / "models/diffusion/checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = load_checkpoint(checkpoint)
    assert 2 <= interrupted["step"] < 30
    result = run_dmat("train-diffusion", cwd=workdir)
    assert result.returncode == 0, result.stderr
    final = load_checkpoint(checkpoint)
    assert final["step"] == 30 and final["mlflow_run_id"] == interrupted["mlflow_run_id"]
    assert [row["step"] for row in final["log"]] == list(range(2, 31, 2))
    assert not list(checkpoint.parent.glob(".*tmp*"))


def test_train_diffusion_under_torchrun(trained: Path, tmp_path: Path) -> None:
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(workdir / "models/diffusion")
    result = _torchrun("train-diffusion", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(workdir / "models/diffusion/checkpoint.pt")["step"] == 2
