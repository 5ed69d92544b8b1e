"""The `pipeline` image, built and run: `dmat --help`, and the tiny `dvc repro` on a mounted copy of the project.

Opt-in (`make container-pipeline-test`, which sets DMAT_TEST_PIPELINE_IMAGE=1): the image holds torch, gigabytes
to download and to store, which CI's time budget leaves out. Where download.pytorch.org is unreachable, set
TORCH_INDEX_URL=https://pypi.org/simple (PyPI's torch is the CUDA build: a larger image, the same results).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import SHARED_ARCHIVE, make_archive, make_image_folder
from tests.containers import engine
from tests.e2e.test_pipeline import STAGES, copy_project, run, tiny_params

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("DMAT_TEST_PIPELINE_IMAGE") != "1",
    reason="the pipeline image (torch) is opt-in: make container-pipeline-test")]

REPRO_TIMEOUT_S = 3600
STAND_IN_UID = 4242  # a caller without an account in the image, as most host users are


@pytest.fixture(scope="module")
def pipeline_image(base_images: dict[str, str]) -> str:
    index = os.environ.get("TORCH_INDEX_URL")
    return engine.build("pipeline", engine.compose_image("pipeline"), base_images["PYTHON_IMAGE"],
                        *([f"TORCH_INDEX_URL={index}"] if index else []))


def test_dmat_help_runs_in_the_image(pipeline_image: str) -> None:
    result = engine.podman("run", "--rm", pipeline_image, "dmat", "--help")
    assert "prepare" in result.stdout and "verify" in result.stdout


def test_tiny_repro_in_the_image_writes_files_owned_by_the_caller(pipeline_image: str, tmp_path: Path) -> None:
    """README: `docker run --rm -v "$PWD:/workspace" --user "$(id -u):$(id -g)" dmat-pipeline dvc repro`."""
    data = SHARED_ARCHIVE if SHARED_ARCHIVE.is_file() else make_archive(
        make_image_folder(tmp_path / "folder", {"train": 40, "test": 10}, size=32), tmp_path / "tiny.tar.gz")
    project = copy_project(tmp_path / "project")
    (project / "params.yaml").write_text(tiny_params(data))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny"]):
        run(command, project)
    uid = os.getuid() or STAND_IN_UID  # root calls as an ordinary user: root owns everything anyway
    gid = os.getgid() or STAND_IN_UID
    for path in [project, *project.rglob("*")]:
        os.lchown(path, uid, gid)

    result = engine.podman("run", "--rm", "--init", "--user", f"{uid}:{gid}", "-v", f"{project}:/workspace",
                           "-v", f"{data}:{data}:ro", pipeline_image, "dvc", "repro", timeout=REPRO_TIMEOUT_S)

    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout, f"{stage} did not run:\n{result.stdout[-3000:]}"
    verify = json.loads((project / "reports/verify.json").read_text())
    assert verify["passed"], verify["failed"]
    assert (project / "models/export/classifier.onnx").is_file() and (project / "dvc.lock").is_file()
    foreign = [str(p.relative_to(project)) for p in project.rglob("*") if p.lstat().st_uid != uid]
    assert not foreign, f"not owned by the caller ({uid}): {foreign[:10]}"
