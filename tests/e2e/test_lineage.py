"""End to end: `dmat lineage` on the ONNX model of a real `dvc repro` (tiny params), then with one upstream
file changed behind DVC's back."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dmat.artifacts.loaders import load_classifier
from dmat.files import write_json
from tests.conftest import BIN_DIR
from tests.e2e.test_pipeline import run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CHAIN = ["export", "evaluation", "evaluation", "classifier", "mixed", "synthetic", "diffusion", "real", "real", "real",
         "real", "source"]  # real: train, val, test, heldout


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline: Path) -> Path:
    """The session's tiny pipeline, read only (tests that change files use a copy)."""
    return tiny_pipeline


def lineage(project: Path, artifact: str, expect: int) -> dict:
    return json.loads(run([str(BIN_DIR / "dmat"), "lineage", artifact, "--json"], project, expect=expect).stdout)


def statuses(report: dict) -> dict[str, str]:
    return {stage["path"]: stage["status"] for stage in report["stages"]}


def test_exported_model_is_verified_through_the_whole_chain(pipeline: Path) -> None:
    report = lineage(pipeline, "models/export/classifier.onnx", expect=0)
    assert report["status"] == "verified" and report["counts"]["stale"] == report["counts"]["missing"] == 0
    assert [stage["stage"] for stage in report["stages"]] == CHAIN
    stages = {stage["path"]: stage for stage in report["stages"]}
    _, checkpoint = load_classifier(pipeline / "models/classifier/best.pt")
    assert stages["models/classifier/best.pt"]["details"]["mlflow_run"].startswith(checkpoint.mlflow_run_id)
    evaluation = json.loads((pipeline / "models/eval/linf/report.json").read_text())
    assert stages["models/eval/linf"]["details"]["mlflow_run"].startswith(evaluation["mlflow_run_id"])
    assert "mode adversarial" in stages["models/diffusion/checkpoint.pt"]["details"]["adversarial_training"]
    commit = run(["git", "rev-parse", "HEAD"], pipeline).stdout.strip()
    assert stages["models/export/classifier.onnx"]["details"]["git_commit"] == commit
    for stage in report["stages"][:-1]:  # every stage the pipeline ran names its MLflow run
        assert stage["details"].get("mlflow_run"), stage["path"]
    text = run([str(BIN_DIR / "dmat"), "lineage", "models/export/classifier.onnx"], pipeline).stdout
    assert "diffusion model: models/diffusion/checkpoint.pt  [verified]" in text and text.rstrip().endswith("VERIFIED")


def flip_a_generated_pixel(project: Path) -> None:
    images = np.load(project / "data/synthetic/images.npy", mmap_mode="r+")
    images[0, 0, 0, 0] ^= 1
    images.flush()


def rewrite_the_mix_fraction(project: Path) -> None:
    manifest = json.loads((project / "data/mixed/manifest.json").read_text())
    write_json(project / "data/mixed/manifest.json", {**manifest, "synthetic_fraction": 0.9})


@pytest.mark.parametrize(("change", "changed"), [(flip_a_generated_pixel, "data/synthetic"),
                                                 (rewrite_the_mix_fraction, "data/mixed")])
def test_changed_upstream_file_is_stale_and_the_rest_verified(pipeline: Path, tmp_path: Path,
                                                              change: Callable[[Path], None], changed: str) -> None:
    project = shutil.copytree(pipeline, tmp_path / "project", symlinks=True)
    change(project)
    report = lineage(project, "models/export/classifier.onnx", expect=1)
    assert report["status"] == "stale"
    assert statuses(report) == {path: "stale" if path == changed else "verified" for path in statuses(report)}
    assert report["problems"] and all(p["path"] == changed and p["status"] == "stale" for p in report["problems"])
