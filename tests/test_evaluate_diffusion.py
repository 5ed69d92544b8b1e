"""`evaluate-diffusion` for real on a tiny project: metrics under the reference classifier next to the held-out
real control, the circularity guard, memorisation of copied training images, MLflow record with the recipe, FID
only from a local weights file, clear failures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dmat.artifacts.loaders import load_reference_classifier
from dmat.checkpoint import load_checkpoint
from dmat.data.store import ArrayStore, write_store
from dmat.data.tensors import to_unit_tensor
from tests.conftest import TINY_CLASSES, make_image_folder, run_dmat, write_params

PARAMS = """
base: {{seed: 0}}
data: {{name: tiny, path: {folder}, val_size: 6, train_limit: 15, test_limit: null, heldout_size: 9}}
train_reference: {{epochs: 2, batch_size: 8}}
train_diffusion: {{steps: 2, batch_size: 8, log_every: 2, checkpoint_every: 2, grid_steps: 2,
                  adversarial: {{mode: adversarial}}}}
generate: {{per_class: 4, network_batch: 4, steps: 2}}
mix: {{synthetic_fraction: 0.5, synthetic_limit: 6}}
evaluate_diffusion: {{n_real: 8, n_generated_per_class: {per_class}, n_denoiser: 5, sigmas: [0.2, 1.0],
                     attack_steps: 2, batch_size: 4, radius_floor: 0.1, inception_weights: {inception}}}
"""


def _params(workdir: Path, folder: Path, inception: str = "null", per_class: int = 2) -> None:
    write_params(workdir / "params.yaml", PARAMS.format(folder=folder, inception=inception, per_class=per_class))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after the real upstream stages: 16×16 images of 3 classes; 15 train, 6 val, 9 held out,
    12 test images; 12 generated, of which the mix chose 6. No robust classifier: the stage does not need one."""
    workdir = tmp_path_factory.mktemp("evaluate_diffusion")
    _params(workdir, make_image_folder(workdir / "folder", {"train": 10, "test": 4}, size=16))
    for stage in ("prepare", "train-reference", "train-diffusion", "generate", "mix"):
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
    assert headline["fd_reference"] == report["generated"]["fd_reference"] and len(headline) <= 12  # for DVC
    assert headline["heldout_knn_precision"] == report["heldout_real"]["precision"]
    return report


def _mixed_rows(workdir: Path) -> set[int]:
    return set(np.load(workdir / "data/mixed/synthetic_indices.npy").tolist())


@pytest.mark.slow
def test_metrics_under_the_reference_next_to_the_heldout_control(workdir: Path) -> None:
    assert not (workdir / "models/classifier").exists()
    metrics = _evaluate(workdir)
    generated, control = metrics["generated"], metrics["heldout_real"]
    assert metrics["real"]["n"] == 8 and generated["n"] == control["n"] == 6  # as many held-out images as generated
    for result in (generated, control):
        assert 0 <= result["conditional_accuracy"] <= 1 and set(result["conditional_accuracy_per_class"]) == set(
            TINY_CLASSES)
        low, high = result["conditional_accuracy_interval"]
        assert low <= result["conditional_accuracy"] <= high
        assert math.isfinite(result["fd_reference"]) and result["fd_reference"] >= 0
        assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1 and 0 <= result["memorisation_rate"] <= 1
        assert -1 <= result["class_colour_agreement"] <= 1 and "fid" not in result  # no Inception weights: no FID
    assert metrics["calibration"]["store"] == "data/real/val" and metrics["calibration"]["n"] == 6
    reference = json.loads((workdir / "reports/train_reference.json").read_text())
    assert metrics["reference_classifier"]["model"] == reference["model"] == "wrn-16-1"
    # the control's conditional accuracy is the reference's accuracy on those held-out images
    model, _ = load_reference_classifier(workdir / "models/reference/best.pt")
    heldout = ArrayStore.open(workdir / "data/real/heldout")
    with torch.no_grad():
        predicted = model(to_unit_tensor(np.array(heldout.images), "cpu")).argmax(1).numpy()
    rows = control["rows"]["indices"]
    assert len(rows) == 6 and np.all(np.bincount(heldout.labels[rows]) == 2)  # class-stratified
    assert control["conditional_accuracy"] == float(np.mean(predicted[rows] == heldout.labels[rows]))
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
    assert params["reference.model"] == "wrn-16-1" and params["rows.reused_mixed_rows"] == "0"
    assert run.data.tags["dmat.diffusion_run_id"] == diffusion["mlflow_run_id"]
    assert run.data.tags["dmat.reference_run_id"] == load_checkpoint(workdir / "models/reference/best.pt")[
        "mlflow_run_id"]
    assert run.data.metrics["generated.fd_reference"] == pytest.approx(generated["fd_reference"])
    headline = json.loads((workdir / "metrics/evaluate_diffusion.json").read_text())
    assert {k: run.data.metrics[k] for k in headline} == pytest.approx(headline)  # what `dmat compare` reads
    assert run.data.metrics["denoiser.sigma_1.adversarial_change"] == pytest.approx(
        metrics["denoiser"]["sigma_1"]["adversarial_change"])
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"real/test", "synthetic", "real/heldout",
                                                                   "real/train", "real/val"}


@pytest.mark.slow
def test_generated_rows_stay_outside_the_mix_and_reuse_is_counted(workdir: Path) -> None:
    """The circularity guard: with 6 of 12 generated images outside the mix, 6 evaluated images are exactly those
    (disjoint from the rows the classifier trained on); asking for 9 takes 3 mixed rows and says so."""
    report = _evaluate(workdir)
    rows = report["generated"]["rows"]
    assert rows["n"] == 6 and rows["outside_mix_in_store"] == 6 and rows["reused_mixed_rows"] == 0
    assert not rows["reused_mixed"] and not set(rows["indices"]) & _mixed_rows(workdir)
    _params(workdir, workdir / "folder", per_class=3)
    rows = _evaluate(workdir)["generated"]["rows"]
    assert rows["n"] == 9 and rows["reused_mixed"] and rows["reused_mixed_rows"] == 3
    assert len(set(rows["indices"]) & _mixed_rows(workdir)) == 3


@pytest.mark.slow
def test_a_generator_that_copies_its_training_images_is_flagged(workdir: Path) -> None:
    """data/synthetic replaced by copies of data/real/train: every evaluated image sits at distance 0 from a
    training image, so the memorisation rate is 1, while the held-out real control stays near the quantile."""
    train = ArrayStore.open(workdir / "data/real/train")
    order = np.argsort(train.labels, kind="stable")  # sorted by class, as generate writes
    write_store(workdir / "data/synthetic", train.images[order], train.labels[order], TINY_CLASSES, {"kind": "copies"})
    assert run_dmat("mix", cwd=workdir).returncode == 0
    report = _evaluate(workdir)
    assert report["generated"]["memorisation_rate"] == 1.0
    assert report["generated"]["nearest_train_distance_median"] < 1e-4  # 0 up to float64 round-off
    assert report["heldout_real"]["memorisation_rate"] < 1.0


@pytest.mark.slow
def test_fid_from_a_local_inception_weights_file(workdir: Path) -> None:
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict(),
               workdir / "inception.pt")
    _params(workdir, workdir / "folder", inception="inception.pt")
    metrics = _evaluate(workdir)
    for result in (metrics["generated"], metrics["heldout_real"]):  # FID of both sets against the test images
        assert math.isfinite(result["fid"]) and result["fid"] > 0


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


@pytest.mark.slow
def test_without_heldout_images_there_is_no_control(workdir: Path) -> None:
    """data.heldout_size 0 (the paper profile) leaves data/real/heldout empty: the generated images are still
    measured, the control is absent rather than made up."""
    write_store(workdir / "data/real/heldout", np.zeros((0, 16, 16, 3), np.uint8), np.zeros(0, np.int64),
                TINY_CLASSES, {"kind": "empty"})
    result = run_dmat("evaluate-diffusion", cwd=workdir)
    assert result.returncode == 0, result.stderr
    headline = json.loads((workdir / "metrics/evaluate_diffusion.json").read_text())
    assert not [key for key in headline if key.startswith("heldout_")] and "fd_reference" in headline
    report = json.loads((workdir / "reports/evaluate_diffusion.json").read_text())
    assert report["heldout_real"] is None and report["generated"]["n"] == 6
