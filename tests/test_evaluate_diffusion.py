"""`evaluate-diffusion` for real on a tiny project: metrics file, MLflow record with the recipe, FID only from a
local weights file, clear failures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dmat.checkpoint import load_checkpoint
from tests.conftest import TINY_CLASSES, make_image_folder, run_dmat, write_params

PARAMS = """
base: {{seed: 0}}
data: {{name: tiny, path: {folder}, val_size: 6}}
train_diffusion: {{steps: 2, batch_size: 8, log_every: 2, checkpoint_every: 2, grid_steps: 2,
                  adversarial: {{mode: adversarial}}}}
generate: {{per_class: 4, network_batch: 4, steps: 2}}
mix: {{synthetic_fraction: 0.5}}
train: {{epochs: 1, batch_size: 16, val_limit: 6, attack: {{steps: 1}}, val_attack_steps: 1}}
evaluate_diffusion: {{n_real: 8, n_generated_per_class: 3, n_denoiser: 5, sigmas: [0.2, 1.0], attack_steps: 2,
                     batch_size: 4, radius_floor: 0.1, inception_weights: {inception}}}
"""


def _params(workdir: Path, folder: Path, inception: str = "null") -> None:
    write_params(workdir / "params.yaml", PARAMS.format(folder=folder, inception=inception))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after the real upstream stages: 16×16 images of 3 classes, 12 test images."""
    workdir = tmp_path_factory.mktemp("evaluate_diffusion")
    _params(workdir, make_image_folder(workdir / "folder", {"train": 10, "test": 4}, size=16))
    for stage in ("prepare", "train-diffusion", "generate", "mix", "train"):
        result = run_dmat(stage, cwd=workdir)
        assert result.returncode == 0, result.stderr
    return workdir


@pytest.fixture
def workdir(project: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "work"
    shutil.copytree(project, copy)
    return copy


def _evaluate(workdir: Path) -> dict:
    result = run_dmat("evaluate-diffusion", cwd=workdir)
    assert result.returncode == 0, result.stderr
    headline = json.loads((workdir / "metrics/evaluate_diffusion.json").read_text())
    report = json.loads((workdir / "reports/evaluate_diffusion.json").read_text())
    assert headline["fd_classifier"] == report["fd_classifier"] and len(headline) <= 12  # a few numbers for DVC
    return report


@pytest.mark.slow
def test_metrics_and_mlflow_run_with_the_diffusion_recipe(workdir: Path) -> None:
    metrics = _evaluate(workdir)
    assert metrics["n_real"] == 8 and metrics["n_generated"] == 9  # 3 per class from the 12 generated
    assert 0 <= metrics["conditional_accuracy"] <= 1 and 0 <= metrics["real_test_accuracy"] <= 1
    assert set(metrics["conditional_accuracy_per_class"]) == set(TINY_CLASSES)
    assert math.isfinite(metrics["fd_classifier"]) and metrics["fd_classifier"] >= 0
    assert -1 <= metrics["class_colour_agreement"] <= 1 and -1 <= metrics["class_layout_agreement"] <= 1
    assert "fid" not in metrics  # no Inception weights named: no FID, and nothing downloaded
    assert set(metrics["denoiser"]) == {"sigma_0.2", "sigma_1"}
    for sigma, row in ((0.2, metrics["denoiser"]["sigma_0.2"]), (1.0, metrics["denoiser"]["sigma_1"])):
        assert row["radius"] == pytest.approx((sigma**2 / (1 + sigma**2)) + 0.1, rel=1e-6)  # the params' box
        assert row["denoise_error"] > 0 and row["adversarial_change"] >= row["random_change"] > 0
    diffusion = load_checkpoint(workdir / "models/diffusion/checkpoint.pt")
    assert metrics["adversarial_mode"] == "adversarial"
    assert metrics["training_box"]["floor_max"] == diffusion["adversarial"]["floor_max"]  # reported, not used

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("dmat").experiment_id],
                               "tags.`dmat.stage` = 'evaluate_diffusion'")
    params = run.data.params
    assert params["train_diffusion.adversarial.mode"] == "adversarial" and params["train_diffusion.steps"] == "2"
    assert params["evaluate_diffusion.n_real"] == "8" and params["synthetic.images"] == "12"
    assert run.data.tags["dmat.diffusion_run_id"] == diffusion["mlflow_run_id"]
    assert run.data.metrics["fd_classifier"] == pytest.approx(metrics["fd_classifier"])
    assert run.data.metrics["denoiser.sigma_1.adversarial_change"] == pytest.approx(
        metrics["denoiser"]["sigma_1"]["adversarial_change"])
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"real/test", "synthetic"}


@pytest.mark.slow
def test_fid_from_a_local_inception_weights_file(workdir: Path) -> None:
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict(),
               workdir / "inception.pt")
    _params(workdir, workdir / "folder", inception="inception.pt")
    metrics = _evaluate(workdir)
    assert math.isfinite(metrics["fid"]) and metrics["fid"] > 0


@pytest.mark.parametrize("problem", ["missing", "corrupt", "foreign"])
def test_a_named_but_unusable_inception_file_fails_with_its_name(tmp_path: Path, problem: str) -> None:
    weights = tmp_path / "my-inception.pt"
    if problem == "corrupt":
        weights.write_bytes(b"not a torch file")
    elif problem == "foreign":
        torch.save({"conv.weight": torch.zeros(3, 3)}, weights)
    _params(tmp_path, tmp_path / "folder", inception=str(weights))
    result = run_dmat("evaluate-diffusion", cwd=tmp_path)
    assert result.returncode == 1
    assert str(weights) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "metrics").exists()


def test_bad_params_exit_2_before_writing_anything(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", "evaluate_diffusion: {sigmas: [0.5, 0]}\n")
    result = run_dmat("evaluate-diffusion", cwd=tmp_path)
    assert result.returncode == 2 and "evaluate_diffusion.sigmas" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
