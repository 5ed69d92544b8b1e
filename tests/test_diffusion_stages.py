"""`train-diffusion` and `generate` for real on tiny data: resume, determinism, DDP, MLflow record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dmat.checkpoint import load_checkpoint
from dmat.data.store import ArrayStore
from tests.conftest import kill_when_written, make_image_folder, run_dmat, run_torchrun, write_params

pytestmark = pytest.mark.slow

PARAMS = """
base: {{seed: 0, precision: {precision}, memory_format: {memory_format}}}
data: {{name: tiny, path: {folder}, val_size: 6, train_limit: null, test_limit: null, heldout_size: 0}}
train_diffusion: {{steps: {steps}, batch_size: 8, log_every: 2, checkpoint_every: 2, grid_steps: 2,
                  label_dropout: {dropout}, adversarial: {{mode: {mode}, fraction: 0.5}}}}
generate: {{per_class: 5, batch_size: {batch}, network_batch: 4, steps: 3, s_churn: 5, workers: {workers},
           {guidance}}}
"""
GUIDED = "guidance: 2.5, guidance_interval: [0.5, 10]"


def _params(workdir: Path, folder: Path, *, steps: int = 2, mode: str = "adversarial", batch: int = 64,
            workers: int = 1, dropout: float = 0.2, guidance: str = GUIDED, precision: str = "bf16",
            memory_format: str = "channels_last") -> None:
    """Low precision fixed by default: the tests that compare stores need one setting, not a probe's pick."""
    write_params(workdir / "params.yaml", PARAMS.format(folder=folder, steps=steps, mode=mode, batch=batch,
                                                        workers=workers, dropout=dropout, guidance=guidance,
                                                        precision=precision, memory_format=memory_format))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/real and a 2-step diffusion checkpoint on 16×16 images of 3 classes."""
    workdir = tmp_path_factory.mktemp("diffusion")
    folder = make_image_folder(workdir / "folder", {"train": 10, "test": 2}, size=16)
    _params(workdir, folder)
    for stage in ("prepare", "train-diffusion"):
        result = run_dmat(stage, cwd=workdir)
        assert result.returncode == 0, result.stderr
    return workdir


def _copy(trained: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "work"
    shutil.copytree(trained, workdir)
    return workdir


def test_train_diffusion_outputs_and_mlflow_record(trained: Path) -> None:
    state = load_checkpoint(trained / "models/diffusion/checkpoint.pt")
    assert state["step"] == 2 and state["adversarial"]["mode"] == "adversarial"
    assert {"model", "ema", "optimizer", "model_config", "classes"} <= set(state)
    metrics = json.loads((trained / "metrics/train_diffusion.json").read_text())
    assert metrics["diffusion_steps"] == 2 and metrics["diffusion_regulariser"] > 0
    assert (metrics["diffusion_precision"], metrics["diffusion_memory_format"]) == ("bf16", "channels_last")
    report = json.loads((trained / "reports/train_diffusion.json").read_text())
    assert report["precision_source"] == "requested"
    assert state["precision"]["precision"] == "bf16"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    run = client.get_run(state["mlflow_run_id"])
    assert run.data.params["train_diffusion.adversarial.mode"] == "adversarial"
    assert run.data.params["base.precision"] == "bf16" and run.data.params["precision"] == "bf16"
    assert {"loss", "regulariser", "images_per_s"} <= set(run.data.metrics)
    assert "samples_grid.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_generate_is_identical_for_any_batch_size_and_process_count(trained: Path, tmp_path: Path) -> None:
    """Guided (one batched conditional + unconditional call) and stochastic (churn) sampling included,
    with the network in bf16 and channels-last (a fixed setting: the setting itself changes the images)."""
    digests = {}
    for batch, workers in ((7, 3), (64, 1)):
        workdir = _copy(trained, tmp_path / f"b{batch}")
        _params(workdir, workdir / "folder", batch=batch, workers=workers)
        result = run_dmat("generate", cwd=workdir)
        assert result.returncode == 0, result.stderr
        digests[f"batch {batch}, {workers} local workers"] = ArrayStore.open(workdir / "data/synthetic",
                                                                             verify=True).digest
    workdir = _copy(trained, tmp_path / "ddp")
    result = run_torchrun("generate", cwd=workdir)
    assert result.returncode == 0, result.stderr
    digests["2 processes"] = ArrayStore.open(workdir / "data/synthetic", verify=True).digest
    assert len(set(digests.values())) == 1, digests
    store = ArrayStore.open(workdir / "data/synthetic")
    assert len(store) == 15 and np.array_equal(store.labels, np.repeat(np.arange(3), 5))  # sorted by class
    assert store.meta.source["guidance"] == 2.5 and store.meta.source["guidance_interval"] == [0.5, 10]
    assert (store.meta.source["precision"], store.meta.source["memory_format"]) == ("bf16", "channels_last")
    assert (workdir / "plots/generate_grid.png").is_file()
    # 3 Heun steps evaluate at σ 80, 2.52, 0.002 and (corrections) 2.52, 0.002: 5, plus 2 guided at 2.52
    assert json.loads((workdir / "metrics/generate.json").read_text())["generate_nfe"] == 7


def test_guidance_changes_the_images_and_needs_label_dropout(trained: Path, tmp_path: Path) -> None:
    plain = _copy(trained, tmp_path / "plain")
    _params(plain, plain / "folder", guidance="guidance: 1")
    assert run_dmat("generate", cwd=plain).returncode == 0
    guided = _copy(trained, tmp_path / "guided")
    assert run_dmat("generate", cwd=guided).returncode == 0
    images = [ArrayStore.open(w / "data/synthetic").images for w in (plain, guided)]
    assert not np.array_equal(*images)

    untrained_null = _copy(trained, tmp_path / "no-dropout")
    shutil.rmtree(untrained_null / "models/diffusion")
    _params(untrained_null, untrained_null / "folder", dropout=0.0)
    assert run_dmat("train-diffusion", cwd=untrained_null).returncode == 0
    result = run_dmat("generate", cwd=untrained_null)
    assert result.returncode == 2
    assert "generate.guidance = 2.5" in result.stderr and "label_dropout = 0" in result.stderr
    assert not (untrained_null / "data/synthetic").exists()


def test_train_diffusion_resumes_after_sigkill(trained: Path, tmp_path: Path) -> None:
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(workdir / "models/diffusion")
    _params(workdir, workdir / "folder", steps=30, mode="random")
    working = workdir / ".dmat/work/train_diffusion/checkpoint.pt"
    checkpoint = workdir / "models/diffusion/checkpoint.pt"
    kill_when_written("train-diffusion", cwd=workdir, watch=working)
    interrupted = load_checkpoint(working)
    assert 2 <= interrupted["step"] < 30
    assert not checkpoint.exists(), "nothing is published before the stage finishes"
    result = run_dmat("train-diffusion", cwd=workdir)
    assert result.returncode == 0, result.stderr
    final = load_checkpoint(checkpoint)
    assert final["step"] == 30 and final["mlflow_run_id"] == interrupted["mlflow_run_id"]
    assert [row["step"] for row in final["log"]] == list(range(2, 31, 2))
    assert not list(checkpoint.parent.glob(".*tmp*")) and not working.parent.exists()


def test_train_diffusion_underrun_torchrun(trained: Path, tmp_path: Path) -> None:
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(workdir / "models/diffusion")
    result = run_torchrun("train-diffusion", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(workdir / "models/diffusion/checkpoint.pt")["step"] == 2


@pytest.mark.parametrize(("scorer", "fmt", "weights"), [("reference", "REFERENCE_FORMAT", "model"),
                                                       ("robust.pt", "CLASSIFIER_FORMAT", "ema")])
def test_generate_keeps_the_scorers_most_confident_images(trained: Path, tmp_path: Path, scorer: str, fmt: str,
                                                          weights: str) -> None:
    """filter_keep 0.5: 10 candidates per class are generated; exactly the 5 of each class with the highest
    probability of their class under the scorer are kept (brute force over the candidates), whether the scorer is
    the reference classifier or a robust checkpoint named by its path."""
    import torch

    from dmat.artifacts import layout
    from dmat.artifacts.records import ClassifierConfig
    from dmat.checkpoint import save_checkpoint
    from dmat.core.classifiers import build_classifier
    from tests.test_records import classifier_checkpoint

    config = ClassifierConfig(name="wrn-16-1", num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3, dataset="",
                              input_shape=(16, 16, 3))
    torch.manual_seed(0)
    model = build_classifier("wrn-16-1", num_classes=3, mean=config.mean, std=config.std).eval()
    path = layout.REFERENCE_BEST if scorer == "reference" else Path(scorer)
    stores = {}
    for name, generate in (("all", "per_class: 10"), ("kept", f"per_class: 5, filter_keep: 0.5, filter_scorer: "
                                                              f"{scorer}")):
        workdir = _copy(trained, tmp_path / name)
        save_checkpoint(workdir / path, classifier_checkpoint(getattr(layout, fmt), config,
                                                              ("apple", "banana", "cherry"),
                                                              {weights: model.state_dict()}))
        params = (workdir / "params.yaml").read_text().split("generate:")[0]
        (workdir / "params.yaml").write_text(params + f"generate: {{{generate}, network_batch: 4, steps: 2}}\n")
        result = run_dmat("generate", cwd=workdir)
        assert result.returncode == 0, result.stderr
        stores[name] = ArrayStore.open(workdir / "data/synthetic", verify=True)
    candidates, kept = stores["all"], stores["kept"]
    x = torch.from_numpy(np.array(candidates.images)).permute(0, 3, 1, 2).float() / 255
    labels = np.array(candidates.labels)
    with torch.no_grad():
        confidence = model(x).double().softmax(1)[torch.arange(30), torch.from_numpy(labels)].numpy()
    kept_rows = [next(i for i in range(30) if np.array_equal(candidates.images[i], image)) for image in kept.images]
    assert np.array_equal(kept.labels, np.repeat(np.arange(3), 5)) and np.array_equal(labels[kept_rows], kept.labels)
    for c in range(3):  # brute force: every kept candidate of a class beats every dropped one
        mine = set(np.flatnonzero(labels == c)) & set(kept_rows)
        dropped = set(np.flatnonzero(labels == c)) - mine
        assert len(mine) == 5 and min(confidence[list(mine)]) >= max(confidence[list(dropped)])
    assert kept_rows == sorted(kept_rows)  # in candidate order: still sorted by class
    summary = kept.meta.source["filter"]
    assert summary["scorer"] == scorer and summary["candidates"] == 30 and summary["kept"] == 15
    assert summary["mean_confidence_kept"] >= summary["mean_confidence_candidates"]
    assert not (kept.path / "candidates").exists()


def test_generate_with_a_missing_reference_scorer_fails_before_sampling(trained: Path, tmp_path: Path) -> None:
    workdir = _copy(trained, tmp_path)
    params = (workdir / "params.yaml").read_text().split("generate:")[0]
    (workdir / "params.yaml").write_text(params + "generate: {per_class: 2, filter_keep: 0.5, filter_scorer: "
                                                  "reference}\n")
    result = run_dmat("generate", cwd=workdir)
    assert result.returncode == 1 and "models/reference/best.pt: checkpoint not found" in result.stderr
    assert not (workdir / "data/synthetic").exists()
def test_the_precision_changes_the_images_and_auto_records_its_probe(trained: Path, tmp_path: Path) -> None:
    stores = {}
    for precision, memory_format in (("fp32", "contiguous"), ("bf16", "channels_last"), ("auto", "auto")):
        workdir = _copy(trained, tmp_path / precision)
        _params(workdir, workdir / "folder", precision=precision, memory_format=memory_format)
        result = run_dmat("generate", cwd=workdir)
        assert result.returncode == 0, result.stderr
        stores[precision] = ArrayStore.open(workdir / "data/synthetic")
    assert not np.array_equal(stores["fp32"].images, stores["bf16"].images)
    assert np.abs(stores["fp32"].images.astype(int) - stores["bf16"].images.astype(int)).mean() < 8  # same samples
    report = json.loads((workdir / "reports/generate.json").read_text())
    assert report["precision_source"] == "probe" and len(report["probe_ms"]) == 4
    chosen = (report["precision"], report["memory_format"])
    assert (stores["auto"].meta.source["precision"], stores["auto"].meta.source["memory_format"]) == chosen
