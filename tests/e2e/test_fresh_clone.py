"""End to end: the repository cloned somewhere with no `../shared` beside it, and the committed params.yaml.

With torchvision's CIFAR-10 archive where the download lands (the fixture stands in for the network),
`dvc repro prepare` reads it through torchvision; with neither that nor the offline archive, and no network,
the first stage fails with one message and no data is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest

from dmat.data.sources import source_sha256
from dmat.data.store import ArrayStore
from tests.conftest import BIN_DIR
from tests.e2e.test_pipeline import copy_project, run
from tests.torchvision_files import NO_NETWORK, Checksums, dmat_launcher, write_cifar

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DVC = str(BIN_DIR / "dvc")


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """The repository as a fresh clone has it, in a folder with no `shared` beside it."""
    project = copy_project(tmp_path / "elsewhere" / "project")
    assert not (project.parent / "shared").exists()
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "clone"]):
        run(command, project)
    return project


def launcher_env(tmp_path: Path, checksums: Checksums) -> dict[str, str]:
    """DVC's stages run a `dmat` that points torchvision's checksum table at the fixture; nothing can download."""
    launcher = dmat_launcher(tmp_path / "bin", checksums)
    return {**NO_NETWORK, "PATH": f"{launcher.parent}{os.pathsep}{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_committed_params_read_the_download_through_torchvision(clone: Path, tmp_path: Path) -> None:
    # Enough images for the committed sizes (val 1,024, train 5,000, held out 1,000, test 2,000), as the archive a
    # download leaves.
    checksums = write_cifar(clone / "data" / "downloads", "cifar10", train_per_class=710, test_per_class=200,
                            archived=True, class_names=CIFAR10_CLASSES)
    env = launcher_env(tmp_path, checksums)
    result = run([DVC, "repro", "prepare"], clone, env=env)
    assert "Running stage 'fetch'" in result.stdout and "Running stage 'prepare'" in result.stdout

    stores = {n: ArrayStore.open(clone / "data" / "real" / n, verify=True) for n in ("train", "val", "test", "heldout")}
    assert {n: len(s) for n, s in stores.items()} == {"train": 5000, "val": 1024, "test": 2000, "heldout": 1000}
    assert stores["test"].classes == tuple(CIFAR10_CLASSES) and set(stores["test"].meta.class_counts) == {200}
    folder = clone / "data" / "downloads" / "cifar-10-batches-py"
    recorded = {"kind": "torchvision", "name": "cifar10", "path": "data/downloads/cifar-10-batches-py",
                "sha256": source_sha256(folder)}
    assert json.loads((clone / "data" / "source.json").read_text())["test"] == {**recorded, "split": "test"}
    assert {k: stores["train"].meta.source[k] for k in recorded} == recorded

    lineage = json.loads(run([str(BIN_DIR / "dmat"), "lineage", "data/real/train", "--json"], clone).stdout)
    assert lineage["status"] == "verified" and [s["stage"] for s in lineage["stages"]] == ["real", "source"]

    again = run([DVC, "repro", "prepare"], clone, env=env)  # fetch looks again; the data has not changed
    assert "Running stage 'fetch'" in again.stdout and "Stage 'prepare' didn't change, skipping" in again.stdout

    meta = folder / "batches.meta"  # the data changes (renamed classes): prepare reruns
    meta.write_bytes(pickle.dumps({"label_names": [f"renamed-{c}" for c in CIFAR10_CLASSES]}))
    renamed = [c for c in checksums if c[1] != "meta"] + [
        ("CIFAR10", "meta", {"filename": "batches.meta", "key": "label_names",
                             "md5": hashlib.md5(meta.read_bytes()).hexdigest()})]
    changed = run([DVC, "repro", "prepare"], clone, env=launcher_env(tmp_path, renamed))
    assert "Running stage 'prepare'" in changed.stdout
    assert ArrayStore.open(clone / "data" / "real" / "test").classes[0] == "renamed-airplane"


def test_without_archive_download_or_network_the_first_stage_fails_cleanly(clone: Path) -> None:
    result = run([DVC, "repro", "prepare"], clone, expect=255, env=NO_NETWORK)
    output = result.stdout + result.stderr
    assert output.count("dmat fetch: error: no cifar10 data: data.path ../shared/data/cifar10-jpeg.tar.gz does not "
                        "exist") == 1, output
    assert "(1) put an image folder or archive" in output and "(2) connect to a network once" in output
    assert "Traceback" not in output and "failed to reproduce 'fetch'" in output
    for path in ("data/real", "data/downloads", "data/source.json", "mlflow.db"):
        assert not (clone / path).exists(), path
    assert run(["git", "status", "--porcelain", "--", "metrics", "plots", "dvc.lock"], clone).stdout == ""  # committed
