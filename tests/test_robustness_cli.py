"""`dmat robustness` on models DMAT did not train: a torch.export program and an ONNX file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dmat.data.store import write_store
from tests.conftest import run_dmat, run_torchrun
from tests.core.test_robustness import CLASSES, SoftmaxOutput, colour_data, train_colour_model


@pytest.fixture(scope="module")
def foreign_model() -> nn.Module:
    """A small classifier trained here, outside the pipeline."""
    return train_colour_model(hidden=16, steps=100)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, y = colour_data(40, seed=2)
    images = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    path = tmp_path_factory.mktemp("store") / "test"
    write_store(path, images, y.numpy(), CLASSES, {"kind": "test"})
    return path


def export_program(model: nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.rand(4, 3, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def robustness(model: Path, store: Path, tmp_path: Path, *extra: str) -> tuple[int, dict | None, str]:
    out = tmp_path / "report.json"
    result = run_dmat("robustness", str(model), "--data", str(store), "--n", "24", "--eps", "16/255",
                      "--seed", "1", "--batch-size", "24", "--json", str(out), *extra, cwd=tmp_path)
    return result.returncode, json.loads(out.read_text()) if out.exists() else None, result.stderr


def test_evaluates_a_torch_export_program(foreign_model, store, tmp_path) -> None:
    code, report, stderr = robustness(export_program(foreign_model, tmp_path / "model.pt2"), store, tmp_path,
                                      "--version", "custom", "--attacks", "apgd-ce,apgd-t")
    assert code == 0, stderr
    assert report["n"] == 24 and 0 <= report["robust_acc"] <= report["clean_acc"] <= 1
    assert report["clean_acc"] > 0.9  # the model learnt the colours
    assert report["attacks"] == ["apgd-ce", "apgd-t"] and set(report["per_attack"]) == {"clean", "apgd-ce", "apgd-t"}
    assert set(report["per_class"]["clean"]) == set(CLASSES)
    assert report["settings"]["model_kind"] == "torch.export" and report["settings"]["eps"] == pytest.approx(16 / 255)
    assert report["sanity_passed"] and report["flags"] == [] and not report["gradient_free_only"]


def test_onnx_runs_square_only_and_says_so(foreign_model, store, tmp_path) -> None:
    path = tmp_path / "model.onnx"
    torch.onnx.export(foreign_model, (torch.rand(4, 3, 8, 8),), str(path), dynamo=True, input_names=["image"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    code, report, stderr = robustness(path, store, tmp_path, "--square-queries", "200")
    assert code == 0, stderr
    assert report["gradient_free_only"] and report["attacks"] == ["square"] and report["version"] == "custom"
    assert report["settings"]["model_kind"] == "onnx" and report["sweep"] == []
    assert report["robust_acc"] <= report["clean_acc"]


def test_softmax_model_is_flagged(foreign_model, store, tmp_path) -> None:
    code, report, _ = robustness(export_program(SoftmaxOutput(foreign_model), tmp_path / "soft.pt2"), store,
                                 tmp_path, "--version", "custom", "--attacks", "apgd-ce")
    assert code == 0 and "softmax_output" in report["flags"] and not report["sanity_passed"]


@pytest.mark.parametrize("args, message", [
    (("--eps", "8/0"), "--eps"),
    (("--eps", "0.1", "--version", "custom"), "--attacks goes with --version custom"),
    (("--eps", "0.1", "--attacks", "apgd-ce,pgd"), "--attacks"),
    (("--eps", "0.1", "--n", "0"), "--n"),
])
def test_bad_arguments_exit_2_naming_them(store, tmp_path, args, message) -> None:
    result = run_dmat("robustness", "model.pt2", "--data", str(store), *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr


def test_missing_model_and_bad_store_exit_1(foreign_model, store, tmp_path) -> None:
    result = run_dmat("robustness", "missing.pt2", "--data", str(store), "--eps", "0.1", cwd=tmp_path)
    assert result.returncode == 1 and "missing.pt2: model file not found" in result.stderr
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    result = run_dmat("robustness", "junk.pt2", "--data", str(store), "--eps", "0.1", cwd=tmp_path)
    assert result.returncode == 1 and "junk.pt2" in result.stderr
    model = export_program(foreign_model, tmp_path / "ok.pt2")
    result = run_dmat("robustness", str(model), "--data", str(tmp_path / "nowhere"), "--eps", "0.1", cwd=tmp_path)
    assert result.returncode == 1 and "nowhere" in result.stderr


@pytest.mark.slow
def test_torchrun_with_two_processes_reports_what_one_process_does(foreign_model, store, tmp_path) -> None:
    """3 batches of 8 over 2 gloo processes vs one process (one thread each): the same report."""
    model = export_program(foreign_model, tmp_path / "model.pt2")
    args = ("robustness", str(model), "--data", str(store), "--points", "24", "--eps", "0.2", "--seed", "1",
            "--batch-size", "8", "--version", "custom", "--attacks", "apgd-ce,apgd-t", "--json")
    single = run_dmat(*args, str(tmp_path / "one.json"), cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    sharded = run_torchrun(*args, str(tmp_path / "two.json"), cwd=tmp_path)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    reports = [json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json")]
    assert [r["settings"].pop("processes") for r in reports] == [1, 2]
    for report in reports:
        for timing in ("seconds", "seconds_autoattack", "images_per_s"):
            report.pop(timing)
    assert reports[0] == reports[1]
    assert reports[0]["robust_acc"] < reports[0]["clean_acc"]  # eps 0.2 breaks some points
