"""`mix` and `train` for real on a tiny image folder: manifest, training, checkpoints, resume after SIGKILL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dmat.artifacts.records import ClassifierHeader
from dmat.checkpoint import load_checkpoint
from dmat.data.store import ArrayStore, write_store
from tests.conftest import (
    TINY_CLASSES,
    class_image,
    kill_when_written,
    killed_before_publishing,
    make_image_folder,
    run_dmat,
    run_torchrun,
    write_params,
)
from tests.test_records import rewritten

PARAMS = """
base: {{seed: 0}}
data: {{name: tiny, path: {folder}, val_size: 12, train_limit: null, test_limit: null, heldout_size: 0}}
mix: {{synthetic_fraction: {fraction}, synthetic_limit: {limit}}}
train: {{model: wrn-16-1, loss: {loss}, epochs: {epochs}, batch_size: 16, lr: 0.05, val_limit: 12,
        attack: {{norm: {norm}, eps: {eps}, steps: 2}}, val_attack_steps: 3}}
"""


def _synthetic_store(path: Path, per_class: int = 20, size: int = 16) -> ArrayStore:
    """A generated-like store: sorted by class, like the generate stage writes."""
    images = np.stack([class_image(label, 500 + i, size) for label in range(3) for i in range(per_class)])
    return write_store(path, images, np.repeat(np.arange(3), per_class), TINY_CLASSES, {"kind": "test"})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/real from a tiny image folder, plus a generated-like store: prepared once per module."""
    workdir = tmp_path_factory.mktemp("prepared")
    folder = make_image_folder(workdir / "folder", {"train": 28, "test": 6}, size=16)
    write_params(workdir / "params.yaml", PARAMS.format(folder=folder, fraction=0.5, limit="null", epochs=2,
                                                        loss="trades", norm="Linf", eps="8/255"))
    assert run_dmat("prepare", cwd=workdir).returncode == 0
    _synthetic_store(workdir / "data" / "synthetic")
    return workdir


@pytest.fixture
def workspace(prepared: Path, tmp_path: Path):
    """A fresh copy of the prepared workspace with the given mix/train params."""

    def make(*, fraction: float = 0.5, limit: str = "null", epochs: int = 2, loss: str = "trades",
             norm: str = "Linf", eps: str = "8/255") -> Path:
        workdir = tmp_path / "work"
        shutil.copytree(prepared, workdir)
        write_params(workdir / "params.yaml", PARAMS.format(folder=prepared / "folder", fraction=fraction,
                                                            limit=limit, epochs=epochs, loss=loss, norm=norm, eps=eps))
        return workdir

    return make


def _mix(workdir: Path) -> dict:
    result = run_dmat("mix", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return json.loads((workdir / "data" / "mixed" / "manifest.json").read_text())


def test_mix_manifest_names_both_stores_and_draws_a_stratified_subset(workspace) -> None:
    workdir = workspace(limit="9")
    manifest = _mix(workdir)
    assert manifest["real"]["sha256"] == ArrayStore.open(workdir / "data/real/train").digest
    assert manifest["synthetic"]["sha256"] == ArrayStore.open(workdir / "data/synthetic").digest
    assert manifest["synthetic"]["used"] == 9 and manifest["synthetic_fraction"] == 0.5
    assert manifest["synthetic"]["class_counts_used"] == {"apple": 3, "banana": 3, "cherry": 3}
    rows = np.load(workdir / "data" / "mixed" / "synthetic_indices.npy")
    assert not np.array_equal(rows, np.arange(9))  # a seeded draw, never a prefix


def test_mix_fraction_zero_uses_no_generated_images(workspace) -> None:
    workdir = workspace(fraction=0.0)
    assert _mix(workdir)["synthetic"]["used"] == 0


@pytest.mark.parametrize(("broken", "message"), [
    ("shape", "cannot share a batch"), ("classes", "differ from"), ("empty", "the store is empty")])
def test_mix_refuses_incompatible_stores(workspace, broken: str, message: str) -> None:
    workdir = workspace()
    path = workdir / "data" / "synthetic"
    if broken == "shape":
        write_store(path, np.zeros((3, 8, 8, 3), np.uint8), np.arange(3), TINY_CLASSES, {})
    elif broken == "classes":
        write_store(path, np.zeros((3, 16, 16, 3), np.uint8), np.arange(3), ("x", "y", "z"), {})
    else:
        write_store(path, np.zeros((0, 16, 16, 3), np.uint8), np.zeros(0, np.int64), TINY_CLASSES, {})
    result = run_dmat("mix", cwd=workdir)
    assert result.returncode == 1 and message in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("fraction", "loss", "norm", "eps", "step"), [
    (0.5, "trades", "Linf", "8/255", 2.5 * (8 / 255) / 2), (0.0, "trades", "Linf", "8/255", 2.5 * (8 / 255) / 2),
    (0.5, "pgd-at", "L2", "0.5", 2 * 0.5 / 2)])  # step_size null: derived per norm from eps and 2 steps
def test_train_writes_checkpoints_metrics_curves_and_mlflow_record(workspace, fraction: float, loss: str, norm: str,
                                                                   eps: str, step: float) -> None:
    workdir = workspace(fraction=fraction, loss=loss, norm=norm, eps=eps)
    _mix(workdir)
    result = run_dmat("train", cwd=workdir)
    assert result.returncode == 0, result.stderr
    best = load_checkpoint(workdir / "models/classifier/best.pt")
    last = load_checkpoint(workdir / "models/classifier/last.pt")
    for state in (best, last):
        assert {"model", "ema", "model_config", "classes", "threat", "mlflow_run_id"} <= set(state)
        assert state["classes"] == list(TINY_CLASSES) and state["threat"]["norm"] == norm
    for name in ("best.pt", "last.pt"):  # each loads as its header, and is written again byte for byte from it
        rewritten(workdir / "models/classifier" / name, ClassifierHeader)
    assert "optimizer" in last and last["epoch"] == 2 and len(last["history"]) == 2
    metrics = json.loads((workdir / "metrics/train.json").read_text())
    assert metrics["train_epochs"] == 2 and metrics["train_steps"] == 2 * 5  # an epoch is ceil(72 real / 16) steps
    report = json.loads((workdir / "reports/train.json").read_text())
    assert report["precision_source"] == "probe" and len(report["probe_ms"]) == 4  # base.precision auto
    assert last["precision"]["precision"] == metrics["precision"] in ("fp32", "bf16")
    assert (workdir / "plots/train_curves.csv").read_text().count("\n") == 3

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(last["mlflow_run_id"])
    assert run.info.run_name == "train" and run.info.status == "FINISHED"
    assert run.data.params["mix.synthetic_fraction"] == str(fraction)
    assert float(run.data.params["attack.step_size_used"]) == pytest.approx(step)
    manifest = json.loads((workdir / "data/mixed/manifest.json").read_text())
    assert run.data.params["mix.synthetic_sha256"] == manifest["synthetic"]["sha256"]
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert inputs["synthetic"] == manifest["synthetic"]["sha256"][:36]
    assert "val_robust_acc" in run.data.metrics
    assert run.data.params["precision"] == metrics["precision"] and "probe_ms.fp32_contiguous" in run.data.metrics
    assert client.search_logged_models([run.info.experiment_id]), "the model is logged to MLflow"


@pytest.mark.slow
def test_train_resumes_after_sigkill(workspace) -> None:
    workdir = workspace(epochs=4)
    _mix(workdir)
    working, last = workdir / ".dmat/work/train/last.pt", workdir / "models/classifier/last.pt"
    kill_when_written("train", cwd=workdir, watch=working)
    interrupted = load_checkpoint(working)
    assert 1 <= interrupted["epoch"] < 4, "killed after the first epoch's checkpoint, before the end"
    assert not last.exists(), "nothing is published before the stage finishes"
    result = run_dmat("train", cwd=workdir)
    assert result.returncode == 0, result.stderr
    final = load_checkpoint(last)
    assert final["epoch"] == 4 and [r["epoch"] for r in final["history"]] == [1, 2, 3, 4]
    assert final["history"][0] == interrupted["history"][0]  # history kept, not recomputed
    assert final["mlflow_run_id"] == interrupted["mlflow_run_id"]
    assert json.loads((workdir / "metrics/train.json").read_text())["train_steps"] == 4 * 5
    # base.precision auto: the resumed run kept the first run's probed choice instead of probing again
    assert interrupted["precision"]["source"] == "probe" and final["precision"]["source"] == "checkpoint"
    kept = ("precision", "memory_format", "probe_s")
    assert {k: final["precision"][k] for k in kept} == {k: interrupted["precision"][k] for k in kept}
    assert not list(last.parent.glob(".*tmp*")), "no torn temporary checkpoint left behind"
    assert not working.parent.exists(), "the work directory goes once its checkpoints are published"
    # Killed after the last epoch's checkpoint, before it published: DVC removes every output before the re-run,
    # which trains nothing more and still writes all of them
    killed_before_publishing(workdir, working.parent, last.parent,
                             ("plots/train_curves.csv", "metrics/train.json", "reports/train.json"))
    result = run_dmat("train", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(last)["history"] == final["history"]
    assert (workdir / "plots/train_curves.csv").read_text().count("\n") == 1 + 4
    assert json.loads((workdir / "metrics/train.json").read_text())["train_steps"] == 4 * 5


@pytest.mark.slow
def test_train_under_torchrun_with_two_processes(workspace) -> None:
    workdir = workspace(epochs=1)
    _mix(workdir)
    result = run_torchrun("train", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(workdir / "models/classifier/last.pt")
    assert state["epoch"] == 1 and len(state["history"]) == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dmat").experiment_id])
    assert [r.info.run_name for r in runs].count("train") == 1, "only rank 0 records a run"


@pytest.mark.parametrize(("stage", "section", "message"), [
    ("train", "train: {model: wrn-99-1}", "train.model = 'wrn-99-1' is not allowed"),
    ("train-diffusion", "train_diffusion: {model: unet-huge}", "train_diffusion.model = 'unet-huge' is not allowed"),
])
def test_unknown_network_exits_2_before_writing(tmp_path: Path, stage: str, section: str, message: str) -> None:
    write_params(tmp_path / "params.yaml", f"base: {{device: cpu}}\n{section}\n")
    result = run_dmat(stage, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


HELDOUT_PARAMS = """
base: {{seed: 0}}
data: {{name: tiny, path: {folder}, val_size: 12, train_limit: 48, test_limit: null, heldout_size: {heldout}}}
mix: {{synthetic_fraction: 0.5, source: heldout_real}}
train: {{epochs: 1, batch_size: 16, lr: 0.05, val_limit: 12, attack: {{steps: 1}}, val_attack_steps: 1}}
"""


def _heldout_workspace(prepared: Path, tmp_path: Path, heldout: int) -> Path:
    workdir = tmp_path / "heldout"
    workdir.mkdir()
    write_params(workdir / "params.yaml", HELDOUT_PARAMS.format(folder=prepared / "folder", heldout=heldout))
    assert run_dmat("prepare", cwd=workdir).returncode == 0
    return workdir


@pytest.mark.slow
def test_mix_source_heldout_real_trains_on_the_store_the_manifest_names(prepared: Path, tmp_path: Path) -> None:
    """The held-out-real control: train reads data/real/heldout in place of data/synthetic (absent here)."""
    workdir = _heldout_workspace(prepared, tmp_path, heldout=15)
    heldout = ArrayStore.open(workdir / "data/real/heldout")
    manifest = _mix(workdir)
    assert manifest["source"] == "heldout_real" and manifest["synthetic"]["path"] == "data/real/heldout"
    assert manifest["synthetic"]["sha256"] == heldout.digest and manifest["synthetic"]["used"] == 15
    assert not (workdir / "data/synthetic").exists()
    result = run_dmat("train", cwd=workdir)
    assert result.returncode == 0, result.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(load_checkpoint(workdir / "models/classifier/last.pt")["mlflow_run_id"])
    assert {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}["synthetic"] == heldout.digest[:36]
    # a store changed after the mix ran is refused, naming it
    write_store(workdir / "data/real/heldout", np.zeros((3, 16, 16, 3), np.uint8), np.arange(3), TINY_CLASSES, {})
    shutil.rmtree(workdir / "models")
    result = run_dmat("train", cwd=workdir)
    assert result.returncode == 1 and "data/real/heldout: its sha256 differs" in result.stderr


def test_mix_source_heldout_real_without_heldout_images_says_which_key(prepared: Path, tmp_path: Path) -> None:
    workdir = _heldout_workspace(prepared, tmp_path, heldout=0)
    result = run_dmat("mix", cwd=workdir)
    assert result.returncode == 1 and "data.heldout_size = 0" in result.stderr


def test_validation_runs_in_float32_and_contiguous_whatever_the_training_setting(workspace, monkeypatch) -> None:
    """The trained network runs in bf16 channels-last; the PGD-40 validation of the EMA model never does,
    even inside a caller's autocast."""
    import torch

    from dmat.config import load_params
    from dmat.core.losses import trades_loss
    from dmat.core.precision import Decision, Setting
    from dmat.distributed import World
    from dmat.stages.train import Trainer

    workdir = workspace(epochs=1)
    _mix(workdir)
    monkeypatch.chdir(workdir)
    trainer = Trainer(load_params("params.yaml"), World(0, 1, "cpu"))
    trainer.use(Decision(Setting("bf16", "channels_last"), "requested"))
    seen = {"train": [], "validate": []}

    def recorder(phase):
        def record(module, args):
            seen[phase].append((args[0].dtype, torch.is_autocast_enabled("cpu"),
                                args[0].is_contiguous(), all(p.dtype == torch.float32 and p.is_contiguous()
                                                             for p in module.parameters())))
        return record

    trainer.model.register_forward_pre_hook(recorder("train"))
    trainer.ema.module.register_forward_pre_hook(recorder("validate"))
    loss, _ = trades_loss(trainer.trained, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]), steps=2)
    loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trainer.validate()
    # attack (1 clean target + 2 steps) and update (2) forwards: autocast on, channels-last input and weights
    assert seen["train"] == [(torch.float32, True, False, False)] * 5
    # one batch of 12: 3 PGD steps (val_attack_steps), then the clean and the adversarial forward
    assert seen["validate"] == [(torch.float32, False, True, True)] * 5
