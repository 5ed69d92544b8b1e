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
    EvalReport,
    EvalRows,
    MixedStoreRef,
    MixManifest,
    PerClassAccuracy,
    RealStoreRef,
    RecordError,
    SweepPoint,
    from_json,
    to_json,
)
from dmat.errors import DataError


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
    checkpoint = {"model_config": {"name": "tiny"}, "mlflow_run_id": "f" * 32}
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
