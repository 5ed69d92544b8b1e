"""`train-reference` for real on a tiny image folder: the reference classifier's outputs, headline test accuracy,
its own checkpoint format, resume after SIGKILL, torchrun, MLflow record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dmat.artifacts import layout
from dmat.artifacts.loaders import load_classifier, load_reference_classifier, load_scoring_classifier
from dmat.checkpoint import load_checkpoint, save_checkpoint
from dmat.core.stats import wilson_interval
from dmat.data.store import ArrayStore
from dmat.data.tensors import to_unit_tensor
from dmat.errors import CheckpointError
from tests.conftest import (
    TINY_CLASSES,
    kill_when_written,
    killed_before_publishing,
    make_image_folder,
    run_dmat,
    run_torchrun,
    write_params,
)

PARAMS = """
base: {{seed: 0}}
data: {{name: tiny, path: {folder}, val_size: 12, train_limit: 42, test_limit: null, heldout_size: 6}}
train_reference: {{epochs: {epochs}, batch_size: 16, lr: 0.05}}
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/real from 16×16 images of 3 classes: 42 train, 12 val, 6 held out, 18 test."""
    workdir = tmp_path_factory.mktemp("reference")
    folder = make_image_folder(workdir / "folder", {"train": 20, "test": 6}, size=16)
    write_params(workdir / "params.yaml", PARAMS.format(folder=folder, epochs=3))
    assert run_dmat("prepare", cwd=workdir).returncode == 0
    return workdir


@pytest.fixture
def workspace(prepared: Path, tmp_path: Path):
    def make(epochs: int = 3) -> Path:
        workdir = tmp_path / "work"
        shutil.copytree(prepared, workdir)
        write_params(workdir / "params.yaml", PARAMS.format(folder=prepared / "folder", epochs=epochs))
        return workdir

    return make


@pytest.fixture(scope="module")
def trained(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("trained") / "work"
    shutil.copytree(prepared, workdir)
    # A cache of its own: the choice is probed here, not taken from an earlier fixture's decision.
    cache = tmp_path_factory.mktemp("precision-cache")
    result = run_dmat("train-reference", cwd=workdir, env={"DMAT_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    return workdir


@pytest.mark.slow
def test_headline_is_the_best_checkpoints_accuracy_on_all_test_images(trained: Path) -> None:
    metrics = json.loads((trained / "reports/train_reference.json").read_text())
    headline = json.loads((trained / "metrics/train_reference.json").read_text())
    assert headline == {f"reference_{k}": metrics[k] for k in ("test_acc", "test_acc_low", "test_acc_high", "train_s")}
    test = ArrayStore.open(trained / "data/real/test")
    model, state = load_reference_classifier(trained / "models/reference/best.pt")
    images, labels = test.read(np.arange(len(test)))
    with torch.no_grad():
        hits = int((model(to_unit_tensor(images, "cpu")).argmax(1).numpy() == labels).sum())
    assert metrics["n_test"] == len(test) == 18 and metrics["test_acc"] == hits / 18
    assert [metrics["test_acc_low"], metrics["test_acc_high"]] == pytest.approx(list(wilson_interval(hits, 18)))
    assert metrics["test_acc"] >= 0.8, "the class colours are easy: a reference that cannot learn them is broken"
    history = load_checkpoint(trained / "models/reference/last.pt")["history"]
    best = max(history, key=lambda r: r["val_acc"])
    assert state.epoch == metrics["best_epoch"] == best["epoch"] and metrics["best_val_acc"] == best["val_acc"]
    report = json.loads((trained / "reports/train_reference.json").read_text())
    assert set(report["test_acc_per_class"]) == set(TINY_CLASSES) and report["test_sha256"] == test.digest
    assert (trained / "plots/train_reference_curves.csv").read_text().count("\n") == 1 + 3


@pytest.mark.slow
def test_it_trains_in_the_probed_precision_and_records_the_choice(trained: Path) -> None:
    report = json.loads((trained / "reports/train_reference.json").read_text())
    assert report["precision_source"] == "probe" and report["precision"] in ("fp32", "bf16")
    assert {"fp32_contiguous", "fp32_channels_last"} <= set(report["probe_ms"]), report["probe_ms"]
    last = torch.load(trained / "models/reference/last.pt", map_location="cpu", weights_only=True)
    assert (last["precision"]["precision"], last["precision"]["memory_format"]) == (report["precision"],
                                                                                    report["memory_format"])


def test_its_own_checkpoint_format_is_never_mistaken_for_a_robust_one(trained: Path, tmp_path: Path) -> None:
    best = trained / "models/reference/best.pt"
    state = load_checkpoint(best)
    assert state["format"] == layout.REFERENCE_FORMAT and "ema" not in state and "threat" not in state
    with pytest.raises(CheckpointError, match="not a DMAT classifier checkpoint"):
        load_classifier(best)
    robust = tmp_path / "robust.pt"
    save_checkpoint(robust, {**state, "format": layout.CLASSIFIER_FORMAT, "ema": state["model"],
                             "threat": {"norm": "Linf", "eps": 8 / 255}})
    with pytest.raises(CheckpointError, match="not a reference classifier checkpoint"):
        load_reference_classifier(robust)
    for path in (best, robust):  # generate's filter accepts either when named
        assert load_scoring_classifier(path)[1].format == load_checkpoint(path)["format"]


@pytest.mark.slow
def test_mlflow_run_records_real_data_only(trained: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    run = client.get_run(load_checkpoint(trained / "models/reference/last.pt")["mlflow_run_id"])
    assert run.info.run_name == "train_reference" and run.info.status == "FINISHED"
    assert run.data.params["train_reference.model"] == "wrn-16-1"
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"real/train", "real/val", "real/test"}
    assert run.data.metrics["test_acc"] == json.loads((trained / "reports/train_reference.json").read_text())[
        "test_acc"]


@pytest.mark.slow
def test_resumes_after_sigkill(workspace) -> None:
    """Killed mid-training: the re-run resumes from the work directory's checkpoint (DVC deleted the stage's
    outputs in between) and publishes the finished checkpoints to models/reference."""
    workdir = workspace(epochs=4)
    working, last = workdir / ".dmat/work/train_reference/last.pt", workdir / "models/reference/last.pt"
    kill_when_written("train-reference", cwd=workdir, watch=working)
    interrupted = load_checkpoint(working)
    assert 1 <= interrupted["epoch"] < 4, "killed after the first epoch's checkpoint, before the end"
    assert not last.exists(), "nothing is published before the stage finishes"
    result = run_dmat("train-reference", cwd=workdir)
    assert result.returncode == 0, result.stderr
    final = load_checkpoint(last)
    assert [r["epoch"] for r in final["history"]] == [1, 2, 3, 4]
    assert final["history"][0] == interrupted["history"][0] and final["mlflow_run_id"] == interrupted["mlflow_run_id"]
    assert json.loads((workdir / "reports/train_reference.json").read_text())["epochs"] == 4
    assert not working.parent.exists(), "the work directory goes once its checkpoints are published"
    # Killed after the last epoch's checkpoint, before the end: DVC removes every output before the re-run,
    # which trains nothing more and still writes all of them
    killed_before_publishing(workdir, working.parent, last.parent, ("plots/train_reference_curves.csv",
                             "metrics/train_reference.json", "reports/train_reference.json"))
    result = run_dmat("train-reference", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(last)["history"] == final["history"]
    assert (workdir / "plots/train_reference_curves.csv").read_text().count("\n") == 1 + 4
    assert json.loads((workdir / "reports/train_reference.json").read_text())["epochs"] == 4


@pytest.mark.slow
def test_under_torchrun_with_two_processes(workspace) -> None:
    workdir = workspace(epochs=1)
    result = run_torchrun("train-reference", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(workdir / "models/reference/last.pt")["epoch"] == 1
    assert json.loads((workdir / "reports/train_reference.json").read_text())["n_test"] == 18  # all, once


def test_unknown_network_exits_2_before_writing(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", "base: {device: cpu}\ntrain_reference: {model: wrn-99-1}\n")
    result = run_dmat("train-reference", cwd=tmp_path)
    assert result.returncode == 2 and "train_reference.model = 'wrn-99-1' is not allowed" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
