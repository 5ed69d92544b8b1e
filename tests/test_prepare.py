"""`dmat prepare` (and `dmat fetch`) for real: splits, stratified subsets, determinism, MLflow record, sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dmat.data.sources import source_sha256
from dmat.data.store import ArrayStore
from tests.conftest import EVERY_IMAGE, run_dmat, write_params
from tests.torchvision_files import NO_NETWORK, dmat_launcher, fixture_images, write_cifar


def _prepare(workdir: Path, data_path: Path, extra: str = "", seed: int = 3) -> dict:
    """Prepare the tiny data: every image unless `extra` sets the limits (the defaults are CIFAR-10's CPU sizes)."""
    workdir.mkdir(exist_ok=True)
    extra += "".join(f"  {key}: {value}\n" for key, value in (("train_limit", "null"), ("test_limit", "null"),
                                                              ("heldout_size", 0)) if f"  {key}:" not in extra)
    write_params(workdir / "params.yaml",
                 f"base: {{seed: {seed}}}\ndata:\n  name: tiny\n  path: {data_path}\n{extra}")
    result = run_dmat("prepare", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return json.loads((workdir / "reports" / "prepare.json").read_text())  # per store: images, sha256, class counts


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


def test_every_training_seed_is_scored_on_the_same_test_points(tmp_path: Path, image_archive: Path) -> None:
    limits = "  val_size: 3\n  train_limit: 15\n  test_limit: 6\n"
    seed_3, seed_4 = (_prepare(tmp_path / str(seed), image_archive, limits, seed=seed) for seed in (3, 4))
    assert seed_3["train"]["sha256"] != seed_4["train"]["sha256"]  # the seed varies training...
    assert seed_3["test"]["sha256"] == seed_4["test"]["sha256"]  # ...not the yardstick
    other_rows = _prepare(tmp_path / "other", image_archive, limits + "  test_seed: 1\n", seed=3)
    assert other_rows["test"]["sha256"] != seed_3["test"]["sha256"]
    assert other_rows["train"]["sha256"] == seed_3["train"]["sha256"]


def test_prepare_logs_mlflow_run_with_digests(tmp_path: Path, image_archive: Path) -> None:
    metrics = _prepare(tmp_path, image_archive, "  val_size: 3\n")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dmat")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`dmat.stage` = 'prepare'")
    assert run.info.run_name == "prepare" and run.info.status == "FINISHED"
    assert run.data.params["data.val_size"] == "3" and run.data.tags["dmat.stage"] == "prepare"
    assert run.data.metrics["train.images"] == 33
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert inputs["real/train"].dataset.digest == metrics["train"]["sha256"][:36]
    assert {t.key: t.value for t in inputs["real/train"].tags}["dmat.sha256"] == metrics["train"]["sha256"]
    assert "source/tiny" in inputs


def test_bad_data_exits_1_naming_the_file(tmp_path: Path, image_folder: Path) -> None:
    (image_folder / "test" / "apple" / "0001.png").write_bytes(b"junk")
    write_params(tmp_path / "params.yaml", f"data:\n  path: {image_folder}\n  val_size: 3\n{EVERY_IMAGE}")
    result = run_dmat("prepare", cwd=tmp_path)
    assert result.returncode == 1
    assert "0001.png: unreadable or corrupt image" in result.stderr
    assert not (tmp_path / "data" / "real").exists()


def test_limit_larger_than_data(tmp_path: Path, image_archive: Path) -> None:
    write_params(tmp_path / "params.yaml", f"data:\n  path: {image_archive}\n  val_size: 3\n  train_limit: 999\n"
                 "  test_limit: null\n")
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


# torchvision's CIFAR files where the download would land, read through torchvision by the real stages.


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_fetch_and_prepare_read_torchvision_files(tmp_path: Path, name: str) -> None:
    """Default source (auto), data.path absent: fetch and prepare read the download through torchvision."""
    project = tmp_path / "project"
    checksums = write_cifar(project / "data" / "downloads", name, train_per_class=4, test_per_class=2)
    launcher = dmat_launcher(tmp_path / "bin", checksums)
    n_classes = 100 if name == "cifar100" else 10
    write_params(project / "params.yaml", f"base: {{seed: 5}}\ndata:\n  name: {name}\n  path: ../no/archive.tar.gz\n"
                                          f"  val_size: {n_classes}\n  train_limit: {2 * n_classes}\n"
                                          "  test_limit: null\n  heldout_size: 0\n")
    metrics = []
    for _ in range(2):
        for stage in ("fetch", "prepare"):
            result = run_dmat(stage, cwd=project, env=NO_NETWORK, dmat=launcher)
            assert result.returncode == 0, result.stderr
        metrics.append(json.loads((project / "reports" / "prepare.json").read_text()))
    assert metrics[0] == metrics[1]  # same files, same params: same bytes
    stores = {n: ArrayStore.open(project / "data" / "real" / n, verify=True) for n in ("train", "val", "test")}
    assert {n: len(s) for n, s in stores.items()} == {"train": 2 * n_classes, "val": n_classes, "test": 2 * n_classes}
    assert stores["val"].meta.class_counts == (1,) * n_classes
    assert stores["test"].classes == tuple(f"class{c:03d}" for c in range(n_classes))
    test_images, _ = fixture_images(2 * n_classes, n_classes, 100_000)
    np.testing.assert_array_equal(stores["test"].images, test_images)  # torchvision's order is kept
    folder = f"data/downloads/{'cifar-100-python' if name == 'cifar100' else 'cifar-10-batches-py'}"
    recorded = {"kind": "torchvision", "name": name, "path": folder, "sha256": source_sha256(project / folder)}
    assert {k: stores["train"].meta.source[k] for k in recorded} == recorded
    assert json.loads((project / "data" / "source.json").read_text())["train"] == {**recorded, "split": "train"}


def test_without_archive_or_network_fetch_and_prepare_fail_cleanly(tmp_path: Path) -> None:
    """One message naming both ways to provide data, exit 1, no data written (prepare's MLflow run says it failed)."""
    write_params(tmp_path / "params.yaml", "data:\n  path: ../no/cifar10-jpeg.tar.gz\n")
    for stage in ("fetch", "prepare"):
        result = run_dmat(stage, cwd=tmp_path, env=NO_NETWORK)
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith(f"dmat {stage}: error: no cifar10 data:"), result.stderr
        assert "Traceback" not in result.stderr
        assert "at data.path" in errors[0] and "data.download_dir (data/downloads)" in errors[0]
        if stage == "fetch":
            assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()


# The held-out-real control: training-split images in neither train nor val.


def _stores(workdir: Path) -> dict[str, ArrayStore]:
    return {n: ArrayStore.open(workdir / "data" / "real" / n, verify=True) for n in ("train", "val", "test", "heldout")}


def test_heldout_is_a_stratified_draw_outside_train_and_val(tmp_path: Path, image_archive: Path) -> None:
    metrics = _prepare(tmp_path, image_archive, "  val_size: 6\n  train_limit: 15\n  heldout_size: 9\n")
    stores = _stores(tmp_path)
    assert len(stores["heldout"]) == 9 and stores["heldout"].meta.class_counts == (3, 3, 3)
    assert metrics["heldout"]["sha256"] == stores["heldout"].digest
    assert json.loads((tmp_path / "metrics" / "prepare.json").read_text())["heldout_images"] == 9
    # class_image(label, index) differs per index: no held-out image is a train or val image
    seen = {row.tobytes() for name in ("train", "val") for row in stores[name].images}
    assert not any(row.tobytes() in seen for row in stores["heldout"].images)
    assert np.all(stores["heldout"].images.mean(axis=(1, 2)).argmax(axis=1) == stores["heldout"].labels)


def test_heldout_leaves_train_val_and_test_byte_identical(tmp_path: Path, image_archive: Path) -> None:
    """Adding the held-out draw (its own random stream) changes no byte of the three other stores."""
    limits = "  val_size: 6\n  train_limit: 15\n  test_limit: 9\n"
    without, with_heldout = tmp_path / "without", tmp_path / "with"
    for workdir, extra in ((without, ""), (with_heldout, "  heldout_size: 12\n")):
        workdir.mkdir()
        _prepare(workdir, image_archive, limits + extra)
    assert len(ArrayStore.open(without / "data/real/heldout")) == 0  # 0: an empty store, still declared by DVC
    for name in ("train", "val", "test"):
        for file in ("images.npy", "labels.npy", "meta.json"):
            assert (without / "data/real" / name / file).read_bytes() == (with_heldout / "data/real" / name /
                                                                           file).read_bytes(), (name, file)


def test_heldout_larger_than_what_remains_names_both_keys(tmp_path: Path, image_archive: Path) -> None:
    # 36 training images: 6 val, 15 train, 15 left
    write_params(tmp_path / "params.yaml", f"data:\n  path: {image_archive}\n  val_size: 6\n  train_limit: 15\n"
                                           "  test_limit: null\n  heldout_size: 16\n")
    result = run_dmat("prepare", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "data.heldout_size = 16 is more than the 15 training images left" in result.stderr
    assert "data.train_limit" in result.stderr
    assert not (tmp_path / "data" / "real").exists()
