"""`dmat generate` with generate.source external: published .npz parts become data/synthetic (class-sorted, each
file's sha256 in the metadata and in MLflow), filtered by a classifier like samples; a bad file exits 1 naming
the file and the problem, with no store written."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dmat.artifacts import layout
from dmat.artifacts.records import ClassifierConfig
from dmat.checkpoint import save_checkpoint
from dmat.cli import main
from dmat.core.classifiers import build_classifier
from dmat.data.store import ArrayStore, write_store
from dmat.data.tensors import to_unit_tensor
from dmat.files import sha256_file
from tests.conftest import run_dmat
from tests.test_records import classifier_checkpoint

CLASSES = ("a", "b", "c")
SHAPE = (8, 8, 3)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """`dmat generate` run in this process sets one torch thread (as it does in its own process): undo it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def generated(n: int, seed: int, shape: tuple[int, ...] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), rng.integers(0, len(CLASSES), size=n)


def make_project(root: Path, external: list[str], extra: str = "") -> Path:
    """data/real/train (the dataset's classes and image size) and params naming the external files."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = generated(6, seed=99)
    write_store(root / layout.REAL_TRAIN, images, labels, CLASSES, {"kind": "test"})
    (root / "params.yaml").write_text("generate:\n  source: external\n  external: " + json.dumps(external) + "\n"
                                      + extra)
    return root


def scorer_checkpoint(path: Path) -> Path:
    """A DMAT classifier checkpoint (random wrn-16-1 on 8×8 images) to filter with."""
    torch.manual_seed(0)
    model = build_classifier("wrn-16-1", num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    config = ClassifierConfig(name="wrn-16-1", num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3, dataset="",
                              input_shape=tuple(SHAPE))
    save_checkpoint(path, classifier_checkpoint(layout.CLASSIFIER_FORMAT, config, tuple(CLASSES),
                                                {"ema": model.state_dict()}))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[np.ndarray, np.ndarray]]]:
    """A project after `dmat generate` on two parts (one deflated), as the published 20M set comes."""
    root = tmp_path_factory.mktemp("external")
    parts = [generated(37, seed=1), generated(25, seed=2)]
    np.savez(root / "20m_part1.npz", image=parts[0][0], label=parts[0][1])
    np.savez_compressed(root / "20m_part2.npz", image=parts[1][0], label=parts[1][1])
    make_project(root, ["20m_part1.npz", str(root / "20m_part2.npz")])  # a relative and an absolute path
    result = run_dmat("generate", cwd=root)
    assert result.returncode == 0, result.stderr
    return root, parts


def test_parts_become_a_class_sorted_store_with_each_files_sha256(project) -> None:
    root, parts = project
    store = ArrayStore.open(root / layout.SYNTHETIC_DIR, verify=True)
    images, labels = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    order = np.argsort(labels, kind="stable")
    np.testing.assert_array_equal(store.images, images[order])
    np.testing.assert_array_equal(store.labels, labels[order])
    files = store.meta.source["files"]
    assert [f["sha256"] for f in files] == [sha256_file(root / f"20m_part{i}.npz") for i in (1, 2)]
    assert [f["size"] for f in files] == [(root / f"20m_part{i}.npz").stat().st_size for i in (1, 2)]
    report = json.loads((root / "reports" / "generate.json").read_text())
    assert report["source"] == "external" and report["images"] == 62 and report["filter"] is None
    assert json.loads((root / "metrics" / "generate.json").read_text())["generate_images"] == 62
    assert (root / layout.GENERATE_GRID).is_file()


def test_the_mlflow_run_lists_the_files_read_by_sha256(project) -> None:
    from mlflow.tracking import MlflowClient

    root, _ = project
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dmat").experiment_id],
                                "tags.`dmat.stage` = 'generate'")
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs}
    for i in (1, 2):
        assert inputs[f"external/20m_part{i}.npz"]["dmat.sha256"] == sha256_file(root / f"20m_part{i}.npz")
    assert run.data.tags["dmat.generated_source"] == "external"


def test_the_filter_keeps_the_most_confident_share_of_each_class(project, monkeypatch) -> None:
    root, parts = project
    scorer = scorer_checkpoint(root / "scorer.pt")
    (root / "params.yaml").write_text(
        (root / "params.yaml").read_text() + f"  filter_scorer: {scorer}\n  filter_keep: 0.5\n")
    monkeypatch.chdir(root)
    try:
        assert main(["generate"]) == 0
        store = ArrayStore.open(root / layout.SYNTHETIC_DIR, verify=True)
    finally:
        make_project(root, ["20m_part1.npz", str(root / "20m_part2.npz")])
    images, labels = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    order = np.argsort(labels, kind="stable")
    candidates, candidate_labels = images[order], labels[order]
    from dmat.artifacts.loaders import load_scoring_classifier

    model, _ = load_scoring_classifier(scorer)
    with torch.no_grad():
        confidence = model(to_unit_tensor(candidates, "cpu")).double().softmax(1)[
            np.arange(len(candidates)), candidate_labels].numpy()
    expected = []
    for c in range(3):
        rows = np.flatnonzero(candidate_labels == c)
        keep = int(np.rint(len(rows) * 0.5))
        expected += sorted(rows[np.argsort(-confidence[rows], kind="stable")[:keep]])
    np.testing.assert_array_equal(store.images, candidates[np.array(expected)])
    assert store.meta.source["filter"]["kept"] == len(expected) and store.meta.source["filter_keep"] == 0.5


def test_a_file_damaged_inside_its_image_data_leaves_the_previous_store(project, monkeypatch, capsys) -> None:
    root, _ = project
    before = ArrayStore.open(root / layout.SYNTHETIC_DIR).digest
    images, labels = generated(400, seed=3)  # large enough that the damage is found while streaming
    np.savez(root / "damaged.npz", image=images, label=labels)
    with zipfile.ZipFile(root / "damaged.npz") as archive:
        info = archive.getinfo("image.npy")
    data = bytearray((root / "damaged.npz").read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 10_000] ^= 0xFF
    (root / "damaged.npz").write_bytes(bytes(data))
    make_project(root, ["damaged.npz"])
    monkeypatch.chdir(root)
    try:
        assert main(["generate"]) == 1
    finally:
        make_project(root, ["20m_part1.npz", str(root / "20m_part2.npz")])
    assert "damaged.npz ('image'): damaged data (Bad CRC-32" in capsys.readouterr().err
    assert ArrayStore.open(root / layout.SYNTHETIC_DIR).digest == before
    assert sorted(p.name for p in (root / "data").iterdir()) == ["real", "synthetic"]  # no staging left behind


BAD_FILES = {
    "missing key": (lambda p: np.savez(p, image=generated(4, 0)[0]), "no 'label' array"),
    "wrong image dtype": (lambda p: np.savez(p, image=generated(4, 0)[0].astype(np.float32),
                                             label=np.zeros(4, dtype=np.int64)),
                          "('image'): expected uint8 images N×H×W×C, found float32"),
    "wrong image shape": (lambda p: np.savez(p, image=generated(4, 0)[0][..., 0], label=np.zeros(4, dtype=np.int64)),
                          "('image'): expected uint8 images N×H×W×C, found uint8 with shape (4, 8, 8)"),
    "mismatched image size": (lambda p: np.savez(p, image=generated(4, 0, (16, 16, 3))[0],
                                                 label=np.zeros(4, dtype=np.int64)),
                              "('image'): images are 16×16×3 (H×W×C), the dataset's are 8×8×3"),
    "float labels": (lambda p: np.savez(p, image=generated(4, 0)[0], label=np.zeros(4)),
                     "('label'): expected integer labels, one per image, found float64"),
    "labels out of range": (lambda p: np.savez(p, image=generated(4, 0)[0], label=np.array([0, 1, 3, 2])),
                            "label 3 at index 2 is out of range [0, 3) for the dataset's 3 classes"),
    "negative label": (lambda p: np.savez(p, image=generated(4, 0)[0], label=np.array([0, -1, 1, 2])),
                       "label -1 at index 1 is out of range"),
    "labels and images differ in number": (lambda p: np.savez(p, image=generated(4, 0)[0], label=np.zeros(3, int)),
                                           "3 labels for 4 images"),
    "truncated zip": (lambda p: (np.savez(p, image=generated(400, 0)[0], label=generated(400, 0)[1]),
                                 p.write_bytes(p.read_bytes()[:10_000])),
                      "not a readable .npz (zip) file"),
    "not a zip": (lambda p: p.write_bytes(b"<html>404 Not Found</html>"), "not a readable .npz (zip) file"),
    "object array": (lambda p: np.savez(p, image=generated(4, 0)[0], label=np.array([0, 1, None, 2], dtype=object)),
                     "('label'): holds Python objects"),
    "missing file": (lambda p: None, "not found (generate.external)"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_exits_1_naming_it_and_the_problem_with_no_store_written(case: str, tmp_path: Path,
                                                                             monkeypatch, capsys) -> None:
    make_bad, problem = BAD_FILES[case]
    make_bad(tmp_path / "published.npz")
    make_project(tmp_path, ["good.npz", "published.npz"])
    images, labels = generated(5, seed=4)
    np.savez(tmp_path / "good.npz", image=images, label=labels)  # the first part is fine: nothing of it is written
    monkeypatch.chdir(tmp_path)
    assert main(["generate"]) == 1
    error = capsys.readouterr().err
    assert "published.npz" in error and problem in error, error
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["real"]  # no store, no staging directory
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run started
