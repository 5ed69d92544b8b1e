"""`dmat prepare` for real: splits, stratified subsets, determinism, MLflow record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dmat.data.store import ArrayStore
from tests.conftest import run_dmat, write_params


def _prepare(workdir: Path, data_path: Path, extra: str = "") -> dict:
    write_params(workdir / "params.yaml",
                 f"base: {{seed: 3}}\ndata:\n  name: tiny\n  path: {data_path}\n{extra}")
    result = run_dmat("prepare", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return json.loads((workdir / "metrics" / "prepare.json").read_text())


def test_prepare_tiny_archive(tmp_path: Path, image_archive: Path) -> None:
    metrics = _prepare(tmp_path, image_archive, "  val_size: 6\n  train_limit: 15\n  test_limit: 9\n")
    stores = {n: ArrayStore.open(tmp_path / "data" / "real" / n, verify=True) for n in ("train", "val", "test")}
    assert {n: len(s) for n, s in stores.items()} == {"train": 15, "val": 6, "test": 9}
    assert stores["val"].meta.class_counts == (2, 2, 2) and stores["train"].meta.class_counts == (5, 5, 5)
    assert metrics["train"]["sha256"] == stores["train"].digest
    # Image folders are class-sorted: the stores are a seeded shuffle, so a prefix covers several classes.
    assert len(set(stores["test"].labels[:4].tolist())) > 1
    # The colour channel encodes the class: labels still match their images after shuffling.
    assert np.all(stores["train"].images.mean(axis=(1, 2)).argmax(axis=1) == stores["train"].labels)
    # val and train never share an image.
    train_rows = {row.tobytes() for row in stores["train"].images}
    assert not any(row.tobytes() in train_rows for row in stores["val"].images)


def test_prepare_twice_gives_identical_bytes(tmp_path: Path, image_archive: Path) -> None:
    first = _prepare(tmp_path, image_archive, "  val_size: 3\n")
    second = _prepare(tmp_path, image_archive, "  val_size: 3\n")
    assert first == second


def test_prepare_logs_mlflow_run_with_digests(tmp_path: Path, image_archive: Path) -> None:
    metrics = _prepare(tmp_path, image_archive, "  val_size: 3\n")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dmat")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "prepare" and run.info.status == "FINISHED"
    assert run.data.params["data.val_size"] == "3" and run.data.tags["dmat.stage"] == "prepare"
    assert run.data.metrics["train.images"] == 33
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert inputs["real/train"].dataset.digest == metrics["train"]["sha256"][:36]
    assert {t.key: t.value for t in inputs["real/train"].tags}["dmat.sha256"] == metrics["train"]["sha256"]
    assert "source/tiny" in inputs


def test_bad_data_exits_1_naming_the_file(tmp_path: Path, image_folder: Path) -> None:
    (image_folder / "test" / "apple" / "0001.png").write_bytes(b"junk")
    write_params(tmp_path / "params.yaml", f"data:\n  path: {image_folder}\n  val_size: 3\n")
    result = run_dmat("prepare", cwd=tmp_path)
    assert result.returncode == 1
    assert "0001.png: unreadable or corrupt image" in result.stderr
    assert not (tmp_path / "data" / "real").exists()


def test_limit_larger_than_data(tmp_path: Path, image_archive: Path) -> None:
    write_params(tmp_path / "params.yaml", f"data:\n  path: {image_archive}\n  val_size: 3\n  train_limit: 999\n")
    result = run_dmat("prepare", cwd=tmp_path)
    assert result.returncode == 1 and "data.train_limit = 999" in result.stderr


@pytest.mark.slow
def test_full_cifar10_archive(tmp_path: Path, cifar_archive: Path) -> None:
    """The acceptance numbers: 48,976 train / 1,024 val / 10,000 test, correct per-class counts."""
    metrics = _prepare(tmp_path, cifar_archive)
    assert {n: metrics[n]["images"] for n in ("train", "val", "test")} == {"train": 48976, "val": 1024,
                                                                            "test": 10000}
    assert set(metrics["test"]["class_counts"].values()) == {1000}
    val_counts = metrics["val"]["class_counts"]
    assert set(val_counts.values()) == {102, 103} and sum(val_counts.values()) == 1024
    assert all(metrics["train"]["class_counts"][c] == 5000 - val_counts[c] for c in val_counts)
    test = ArrayStore.open(tmp_path / "data" / "real" / "test")
    assert test.classes[0] == "airplane" and test.image_shape == (32, 32, 3)
