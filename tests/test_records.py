"""Typed records between stages: written and read back unchanged; data of another shape is refused with a message
that names the file and the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dmat.artifacts import layout
from dmat.artifacts.loaders import load_eval_report
from dmat.artifacts.records import (
    ClassifierConfig,
    ClassifierHeader,
    DenoiserConfig,
    DiffusionHeader,
    EvalReport,
    EvalRows,
    ImportedClassifierHeader,
    MixedStoreRef,
    MixManifest,
    PerClassAccuracy,
    RealStoreRef,
    RecordError,
    ReferenceHeader,
    SweepPoint,
    Threat,
    checkpoint_contents,
    from_json,
    to_json,
)
from dmat.errors import DataError
from tests.test_diffusion_stages import trained as diffusion_trained  # noqa: F401  (fixtures of the stage tests)
from tests.test_train_reference import prepared, trained  # noqa: F401
from tests.tools.test_import_checkpoint import published  # noqa: F401


def manifest() -> MixManifest:
    return MixManifest(
        real=RealStoreRef(path="data/real/train", sha256="a" * 64, images=90, class_counts={"red": 45, "blue": 45}),
        source="generated",
        synthetic=MixedStoreRef(path="data/synthetic", sha256="b" * 64, images=40, used=20,
                                class_counts_used={"red": 10, "blue": 10}),
        synthetic_fraction=0.5, synthetic_limit=None, seed=3, classes=("red", "blue"),
        indices_file="indices.npy", indices_sha256="c" * 64)


def test_a_manifest_survives_json_unchanged() -> None:
    data = json.loads(json.dumps(to_json(manifest())))
    assert data["classes"] == ["red", "blue"] and data["synthetic_limit"] is None
    assert from_json(MixManifest, data, "manifest.json") == manifest()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("seed"), "manifest.json: missing seed"),
    (lambda d: d["synthetic"].pop("used"), "manifest.json: missing synthetic.used"),
    (lambda d: d.update(seed="3"), "manifest.json: seed = '3' is not of type int"),
    (lambda d: d.update(seed=True), "manifest.json: seed = True is not of type int"),
    (lambda d: d.update(classes="red"), "manifest.json: classes is not a list"),
    (lambda d: d.update(real=[1]), "manifest.json: real. is not a mapping"),
])
def test_a_manifest_of_another_shape_names_the_file_and_the_key(edit, message: str) -> None:
    data = to_json(manifest())
    edit(data)
    with pytest.raises(RecordError, match=message.replace(".", r"\.").replace("(", r"\(")):
        from_json(MixManifest, data, "manifest.json")


def test_an_integer_where_a_float_belongs_is_read_as_a_float() -> None:
    data = {**to_json(manifest()), "synthetic_fraction": 1}
    fraction = from_json(MixManifest, data, "m").synthetic_fraction
    assert fraction == 1.0 and isinstance(fraction, float)


# --- the evaluation report ---------------------------------------------------------------------------------------

# The keys of models/eval/<threat>/report.json as evaluate wrote them before the report was a record: the shape on
# disk is unchanged.
REPORT_KEYS = {
    "threat", "n", "norm", "eps", "version", "attacks", "suite", "seed", "clean_acc", "robust_acc", "per_attack",
    "per_class", "flags", "autoattack_warnings", "gradient_free_only", "sweep", "sanity", "sanity_passed",
    "seconds_autoattack", "images_per_s", "classes", "model", "checkpoint_sha256", "test_sha256", "train_run_id",
    "mlflow_run_id", "seconds_total", "confidence", "rows", "clean_acc_ci", "robust_acc_ci", "per_attack_ci",
    "per_class_n", "per_class_ci"}


def eval_report() -> EvalReport:
    return EvalReport(
        threat="linf", n=4, norm="Linf", eps=8 / 255, version="standard", attacks=("apgd-ce", "apgd-t"),
        suite={"pyautoattack": "0.2.0", "norm": "Linf", "eps": 0.031372549, "version": "standard",
               "attacks": ["apgd-ce", "apgd-t"], "square_queries": None, "pgd_steps": 0, "pgd_restarts": None},
        seed=0, clean_acc=0.75, robust_acc=0.25, per_attack={"clean": 0.75, "apgd-ce": 0.5, "apgd-t": 0.25},
        per_class=PerClassAccuracy(clean={"red": 1.0, "blue": 0.5, "green": None},
                                   robust={"red": 0.5, "blue": 0.0, "green": None}),
        flags=(), autoattack_warnings=("zero gradient",), gradient_free_only=False,
        sweep=(SweepPoint(eps=0.0, robust_acc=0.75), SweepPoint(eps=8 / 255, robust_acc=0.5)),
        sanity={"deterministic": {"passed": True}, "large_eps_at_most_chance": {"passed": False, "acc": 0.5,
                                                                                "chance": 0.5}},
        sanity_passed=False, seconds_autoattack=1.5, images_per_s=2.7, classes=("red", "blue", "green"),
        model="wrn-16-1", checkpoint_sha256="a" * 64, test_sha256="b" * 64, train_run_id="c" * 32,
        mlflow_run_id=None, seconds_total=2.0, confidence=0.95, rows=EvalRows(first=4, rows_id="d" * 16),
        clean_acc_ci=(0.3, 0.95), robust_acc_ci=(0.05, 0.7),
        per_attack_ci={"clean": [0.3, 0.95], "apgd-ce": [0.15, 0.85], "apgd-t": [0.05, 0.7]},
        per_class_n={"red": 2, "blue": 2, "green": 0},
        per_class_ci={"clean": {"red": [0.34, 1.0], "blue": [0.09, 0.9], "green": None},
                      "robust": {"red": [0.09, 0.9], "blue": [0.0, 0.66], "green": None}})


def _write_report(root: Path, data: dict) -> Path:
    path = root / layout.eval_dir("linf") / layout.EVAL_REPORT_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def test_an_evaluation_report_survives_json_unchanged(tmp_path: Path) -> None:
    data = json.loads(json.dumps(to_json(eval_report())))
    assert set(data) == REPORT_KEYS
    assert data["sweep"][1] == {"eps": 8 / 255, "robust_acc": 0.5} and data["rows"] == {"first": 4, "rows_id": "d" * 16}
    assert data["attacks"] == ["apgd-ce", "apgd-t"] and data["clean_acc_ci"] == [0.3, 0.95]
    _write_report(tmp_path, data)
    report = load_eval_report("linf", root=tmp_path)
    assert report == eval_report() and report.failed_checks() == ["large_eps_at_most_chance"]


def test_a_report_written_before_the_attack_suite_was_recorded_loads_without_one(tmp_path: Path) -> None:
    data = to_json(eval_report())
    del data["suite"]
    _write_report(tmp_path, data)
    assert load_eval_report("linf", root=tmp_path).suite is None


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("robust_acc"), "missing robust_acc"),
    (lambda d: d.pop("rows"), "missing rows"),  # written before the intervals (2026-12-01)
    (lambda d: d["rows"].pop("rows_id"), "missing rows.rows_id"),
    (lambda d: d["per_class"].pop("robust"), "missing per_class.robust"),
    (lambda d: d.update(clean_acc="0.75"), "clean_acc = '0.75' is not of type float"),
    (lambda d: d.update(n=4.0), "n = 4.0 is not of type int"),
    (lambda d: d.update(flags="none"), "flags is not a list"),
    (lambda d: d["sweep"][0].update(eps=None), "sweep[0].eps = None is not of type float"),
    (lambda d: d.update(sanity_passed="yes"), "sanity_passed = 'yes' is not of type bool"),
])
def test_an_evaluation_report_of_another_shape_names_the_file_and_the_key(tmp_path: Path, edit,
                                                                          message: str) -> None:
    data = to_json(eval_report())
    edit(data)
    path = _write_report(tmp_path, data)
    with pytest.raises(RecordError, match=re.escape(f"{path}: {message}")):
        load_eval_report("linf", root=tmp_path)


def test_an_unreadable_evaluation_report_names_the_file_and_the_stage(tmp_path: Path) -> None:
    path = tmp_path / layout.eval_dir("linf") / layout.EVAL_REPORT_FILE
    with pytest.raises(DataError, match=re.escape(f"{path}: unreadable evaluation report") + ".*run evaluate@linf"):
        load_eval_report("linf", root=tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2]")
    with pytest.raises(RecordError, match=re.escape(f"{path}: the record is not a mapping")):
        load_eval_report("linf", root=tmp_path)


EVALUATE_PARAMS = {
    "base": {"experiment": "records"},
    "evaluate": {"n": 6, "batch_size": 6, "version": "custom", "attacks": ["apgd-ce"], "sweep_steps": 1,
                 "threats": {"linf": {"norm": "Linf", "eps": 8 / 255, "sweep": [0.0], "large_eps": 0.5}}},
}


def colour_net():
    """Classifies `class_image`s by their dominant colour: right on every clean point, but two of the three classes
    are within reach of an eps = 8/255 attack."""
    import torch
    from torch import nn

    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    with torch.no_grad():
        net[2].weight.copy_(10 * torch.eye(3) + 1)
        net[2].bias.copy_(torch.tensor([0.0, 7.4, 0.0]))  # margins of about 0.4 for two classes
    return net.eval()


def test_what_the_evaluate_stage_writes_loads_as_its_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate@linf for real (a tiny net, AutoAttack's APGD-CE on 6 points): report.json is the record it returned,
    key for key as before, and metrics/evaluate_linf.json keeps its keys."""
    import numpy as np

    from dmat.config import parse_params
    from dmat.data.store import write_store
    from dmat.data.tensors import first_points
    from dmat.distributed import world
    from dmat.stages import evaluate
    from tests.conftest import class_image

    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    classes = ("apple", "banana", "cherry")
    test = write_store(layout.REAL_TEST, np.stack([class_image(i % 3, i) for i in range(6)]), np.arange(6) % 3,
                       classes, {"kind": "test"})
    layout.CLASSIFIER_BEST.parent.mkdir(parents=True)
    layout.CLASSIFIER_BEST.write_bytes(b"a checkpoint")  # what the report's checkpoint_sha256 digests
    params = parse_params(EVALUATE_PARAMS)
    checkpoint = classifier_header()
    recipe = {"diffusion": {"adversarial_mode": "none"}, "train": {"loss": "trades"},
              "mix": {"source": "generated", "synthetic_fraction": 0.5, "generated_images_used": 10}}
    x, y = first_points(test, 6)
    with world("cpu") as w:
        returned = evaluate.evaluate_threat(params, "linf", colour_net(), checkpoint, test, x, y, recipe, w)
    report = load_eval_report("linf")
    assert report == returned and report.threat == "linf" and report.n == 6 and report.mlflow_run_id
    text = (layout.eval_dir("linf") / layout.EVAL_REPORT_FILE).read_text()
    assert set(json.loads(text)) == REPORT_KEYS
    assert text == json.dumps(to_json(report), indent=2, sort_keys=True) + "\n"  # read back, written again: same
    assert set(json.loads(evaluate.metrics_file("linf").read_text())) == {
        f"linf_{key}" for key in ("n", "eps", "clean_acc", "clean_acc_ci_low", "clean_acc_ci_high", "robust_acc",
                                  "robust_acc_ci_low", "robust_acc_ci_high", "sanity_passed", "s")}


# --- checkpoint headers ------------------------------------------------------------------------------------------


def classifier_header() -> ClassifierHeader:
    return ClassifierHeader(
        format=layout.CLASSIFIER_FORMAT, fingerprint="0123456789abcdef", epoch=2,
        model_config=ClassifierConfig(name="wrn-16-1", num_classes=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2),
                                      dataset="", input_shape=(16, 16, 3)),
        classes=("apple", "banana", "cherry"), threat=Threat(norm="Linf", eps=8 / 255), mlflow_run_id="f" * 32,
        history=({"epoch": 1, "val_robust_acc": 0.25}, {"epoch": 2, "val_robust_acc": 0.5}),
        train_config={"loss": "trades", "epochs": 2}, precision={"precision": "fp32", "probe_s": {}})


def classifier_checkpoint(fmt: str, config: ClassifierConfig, classes: tuple[str, ...], weights: dict) -> dict:
    """The contents of a classifier checkpoint as `train` (CLASSIFIER_FORMAT) or `train_reference` writes one,
    around a test's own network `weights` (`ema`, or `model` for the reference)."""
    fields = {"format": fmt, "fingerprint": "0" * 16, "epoch": 1, "model_config": config, "classes": classes,
              "mlflow_run_id": None, "history": ({"epoch": 1},), "train_config": {}, "precision": {}}
    header = (ClassifierHeader(**fields, threat=Threat(norm="Linf", eps=8 / 255)) if fmt == layout.CLASSIFIER_FORMAT
              else ReferenceHeader(**fields))
    return checkpoint_contents(header, weights)


def test_a_checkpoint_header_survives_a_checkpoint_unchanged(tmp_path: Path) -> None:
    """Written with its weights and read back with weights_only=True: the same header, its fields in the order
    DMAT has always written them, the weights before model_config and what resuming needs at the end."""
    import torch

    from dmat.artifacts.loaders import checkpoint_header
    from dmat.checkpoint import load_checkpoint, save_checkpoint

    weights = {"model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}}
    path = tmp_path / "last.pt"
    save_checkpoint(path, checkpoint_contents(classifier_header(), weights, {"optimizer": {}, "grad_scaler": {}}))
    state = load_checkpoint(path)
    assert list(state) == ["format", "fingerprint", "epoch", "model", "ema", "model_config", "classes", "threat",
                           "mlflow_run_id", "history", "train_config", "precision", "optimizer", "grad_scaler"]
    assert state["model_config"]["mean"] == [0.5, 0.4, 0.3] and state["threat"] == {"norm": "Linf", "eps": 8 / 255}
    assert checkpoint_header(state, path) == classifier_header()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("threat"), "missing threat"),
    (lambda d: d.pop("precision"), "missing precision"),  # written before the precision was recorded
    (lambda d: d["model_config"].pop("input_shape"), "missing model_config.input_shape"),
    (lambda d: d.update(epoch="2"), "epoch = '2' is not of type int"),
    (lambda d: d.update(classes="apple"), "classes is not a list"),
    (lambda d: d["threat"].update(eps=None), "threat.eps = None is not of type float"),
])
def test_a_checkpoint_of_another_shape_names_the_file_and_the_key(tmp_path: Path, edit, message: str) -> None:
    import torch

    from dmat.artifacts.loaders import load_classifier
    from dmat.checkpoint import save_checkpoint

    state = checkpoint_contents(classifier_header(), {"ema": {"w": torch.ones(1)}})
    edit(state)
    path = tmp_path / "best.pt"
    save_checkpoint(path, state)
    with pytest.raises(RecordError, match=re.escape(f"{path}: {message}")):
        load_classifier(path)


def test_a_checkpoint_of_an_unknown_format_is_refused(tmp_path: Path) -> None:
    from dmat.artifacts.loaders import checkpoint_header
    from dmat.errors import CheckpointError

    with pytest.raises(CheckpointError, match=re.escape("x.pt: not a DMAT checkpoint (format 'dmat-classifier-0')")):
        checkpoint_header({**to_json(classifier_header()), "format": "dmat-classifier-0"}, "x.pt")


def same(a, b) -> bool:
    """Equal, and of the same types all the way down (a list is not a tuple, an int not a float)."""
    import torch

    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def rewritten(path: Path, cls: type) -> None:
    """A stage's checkpoint, read as its header and put together again with its tensors: the same keys in the same
    order, with the same values of the same types (the header holds every field of the file as it was written)."""
    from dmat.artifacts.loaders import checkpoint_header
    from dmat.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    header = checkpoint_header(state, path)
    assert type(header) is cls
    fields = set(to_json(header))
    weights = {k: v for k, v in state.items() if k in ("model", "ema")}
    training = {k: v for k, v in state.items() if k in ("optimizer", "grad_scaler")}
    assert set(state) == fields | set(weights) | set(training), "every key of the file is the header's or a tensor's"
    assert same(checkpoint_contents(header, weights, training or None), state)


def test_the_reference_stages_checkpoints_load_as_their_header(trained: Path) -> None:  # noqa: F811
    for name in ("best.pt", "last.pt"):
        rewritten(trained / "models/reference" / name, ReferenceHeader)
    from dmat.artifacts.loaders import load_reference_classifier

    _, header = load_reference_classifier(trained / "models/reference/best.pt")
    assert header.format == layout.REFERENCE_FORMAT and header.epoch == len(header.history) >= 1
    assert isinstance(header.model_config, ClassifierConfig) and header.model_config.input_shape == (16, 16, 3)


def test_the_diffusion_stages_checkpoint_loads_as_its_header(diffusion_trained: Path) -> None:  # noqa: F811
    from dmat.artifacts.loaders import load_denoiser

    rewritten(diffusion_trained / layout.DIFFUSION_CHECKPOINT, DiffusionHeader)
    _, header = load_denoiser(diffusion_trained / layout.DIFFUSION_CHECKPOINT)
    assert header.step == 2 and header.adversarial["mode"] == "adversarial" and len(header.log) >= 1
    assert isinstance(header.model_config, DenoiserConfig) and header.model_config.img_resolution == 16


def test_an_imported_checkpoint_loads_as_its_header(published, tmp_path: Path, capsys) -> None:  # noqa: F811
    from dmat.cli import main

    checkpoint, _, store = published
    out = tmp_path / "imported.pt"
    assert main(["import", str(checkpoint), "--arch", "wrn-16-1-swish", "--dataset", "cifar10", "--classes-from",
                 str(store), "--out", str(out)]) == 0
    rewritten(out, ImportedClassifierHeader)
    from dmat.checkpoint import load_checkpoint

    assert list(load_checkpoint(out)) == ["format", "epoch", "ema", "model_config", "classes", "threat",
                                          "mlflow_run_id", "history", "train_config", "imported"]
