"""End to end: `dvc repro` for real in a temporary copy of the repository, then read MLflow back.

The harness grows with every stage: it copies the project (tracked and untracked-but-not-ignored
files, as a fresh clone would have them), writes tiny params, and runs the real pipeline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dmat.data.store import ArrayStore
from tests.conftest import BIN_DIR, REPO_ROOT, SHARED_ARCHIVE, make_archive, make_image_folder

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

GIT_ENV = {"GIT_AUTHOR_NAME": "dmat-test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "dmat-test", "GIT_COMMITTER_EMAIL": "test@localhost"}


def tiny_params(data_path: Path) -> str:
    """Every stage doing its real job on a few images, in seconds."""
    return f"""
base: {{seed: 1, experiment: e2e}}
data:
  name: cifar10
  source: imagefolder
  path: {data_path}
  val_size: 20
  train_limit: 60
  test_limit: 30
train_diffusion: {{steps: 4, batch_size: 8, log_every: 2, checkpoint_every: 2, grid_steps: 2,
                  adversarial: {{mode: adversarial}}}}
generate: {{per_class: 2, batch_size: 8, network_batch: 4, steps: 2}}
mix: {{synthetic_fraction: 0.5}}
train: {{epochs: 1, batch_size: 16, val_limit: 8, attack: {{steps: 1}}, val_attack_steps: 2}}
"""


STAGES = ("prepare", "train_diffusion", "generate", "mix", "train")


def copy_project(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_STAGE")}
    env.update(GIT_ENV, PATH=f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository copy after one `dvc repro` with tiny params."""
    base = tmp_path_factory.mktemp("e2e")
    if SHARED_ARCHIVE.is_file():
        data_path = SHARED_ARCHIVE
    else:  # a fresh clone without ../shared: a small image folder made here
        data_path = make_archive(make_image_folder(base / "folder", {"train": 40, "test": 10}, size=32),
                                 base / "tiny.tar.gz")
    project = copy_project(base / "project")
    (project / "params.yaml").write_text(tiny_params(data_path))
    run(["git", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "e2e"], project)
    run([str(BIN_DIR / "dvc"), "repro"], project)
    return project


def test_outputs_are_canonical_stores(pipeline: Path) -> None:
    sizes = {n: len(ArrayStore.open(pipeline / "data" / "real" / n, verify=True)) for n in ("train", "val", "test")}
    assert sizes == {"train": 60, "val": 20, "test": 30}
    assert len(ArrayStore.open(pipeline / "data" / "synthetic", verify=True)) == 2 * 10


def test_every_stage_wrote_its_declared_outputs(pipeline: Path) -> None:
    for path in ("metrics/prepare.json", "metrics/train_diffusion.json", "metrics/generate.json",
                 "plots/generate_grid.png", "data/mixed/manifest.json", "models/diffusion/checkpoint.pt",
                 "models/classifier/best.pt", "models/classifier/last.pt", "metrics/train.json",
                 "plots/train_curves.csv"):
        assert (pipeline / path).is_file(), path
    result = run([str(BIN_DIR / "dvc"), "metrics", "show", "--json"], pipeline)
    assert "best_val_robust_acc" in result.stdout and "images_per_s" in result.stdout


def test_second_repro_is_up_to_date(pipeline: Path) -> None:
    result = run([str(BIN_DIR / "dvc"), "repro"], pipeline)
    assert "Running stage" not in result.stdout, result.stdout


def test_mlflow_has_one_run_per_stage_with_lineage(pipeline: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    commit = run(["git", "rev-parse", "HEAD"], pipeline).stdout.strip()
    for name, stage_run in runs.items():
        assert stage_run.data.tags["dvc.stage"] == name and stage_run.data.tags["git.commit"] == commit
    assert runs["prepare"].data.params["data.train_limit"] == "60"
    assert {d.dataset.name for d in runs["prepare"].inputs.dataset_inputs} >= {"real/train", "real/val", "real/test"}
    synthetic = ArrayStore.open(pipeline / "data" / "synthetic").digest
    assert {d.dataset.digest for d in runs["train"].inputs.dataset_inputs} >= {synthetic[:36]}
    assert runs["generate"].data.tags["dmat.adversarial_mode"] == "adversarial"


def test_dvc_exp_run_temp_lands_in_the_same_store(pipeline: Path) -> None:
    run([str(BIN_DIR / "dvc"), "exp", "run", "--temp", "-n", "more-epochs", "-S", "train.epochs=2"], pipeline)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert "train@more-epochs" in runs
    assert not list((pipeline / ".dvc" / "tmp").rglob("mlflow.db"))
    artifacts = Path(runs["train@more-epochs"].info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(pipeline.resolve() / "mlruns") and (artifacts / "train_curves.csv").is_file()
