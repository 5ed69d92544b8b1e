"""`dmat import`: a checkpoint in the reference's format (built here with DMAT's network in its key layout) becomes a
DMAT classifier checkpoint with identical logits and a lineage record, which `dmat robustness`, an ONNX export and
`dmat serve` take like a trained one; another architecture or another kind of file is refused, naming why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dmat.artifacts.loaders import load_classifier
from dmat.artifacts.records import Threat
from dmat.cli import main
from dmat.data.store import ArrayStore, write_store
from dmat.data.tensors import first_points
from dmat.files import sha256_file
from dmat.tools.import_checkpoint import CLASS_NAMES
from tests.conftest import run_dmat
from tests.core.test_reference_layout import in_reference_layout, trained_like
from tests.deploy.helpers import http_request, post_json, running_server, serve_command


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, Path]:
    """(a checkpoint as the reference's trainer saves it, the network it holds, a CIFAR-10-shaped test store)."""
    root = tmp_path_factory.mktemp("published")
    source = trained_like("wrn-16-1", seed=3)
    state = in_reference_layout(source, "module.0.")  # DataParallel(Sequential(network))
    torch.save({"model_state_dict": state, "unaveraged_model_state_dict": state}, root / "cifar10_linf_wrn16-1.pt")
    rng = np.random.default_rng(0)
    write_store(root / "test", rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 16),
                CLASS_NAMES["cifar10"], {"kind": "test"})
    return root / "cifar10_linf_wrn16-1.pt", source, root / "test"


def test_import_gives_identical_logits_and_records_the_source_file(published, tmp_path: Path, capsys) -> None:
    checkpoint, source, store = published
    out = tmp_path / "imported.pt"
    assert main(["import", str(checkpoint), "--arch", "wrn-16-1-swish", "--dataset", "cifar10", "--classes-from",
                 str(store), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    model, state = load_classifier(out)
    x = first_points(ArrayStore.open(store), None)[0]
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    imported = state.imported
    assert imported == summary["imported"]
    assert (imported["sha256"], imported["size"]) == (sha256_file(checkpoint), checkpoint.stat().st_size)
    assert (imported["key_prefix"], imported["data_parallel"], imported["sequential_index"]) == ("module.0.", True, 0)
    assert imported["top_level_keys"] == ["model_state_dict", "unaveraged_model_state_dict"]
    assert state.classes == CLASS_NAMES["cifar10"] and state.threat == Threat(norm="Linf", eps=8 / 255)
    assert state.model_config.name == "wrn-16-1" and summary["sha256"] == sha256_file(out)


def test_another_architecture_is_refused_and_nothing_is_written(published, tmp_path: Path, capsys) -> None:
    checkpoint, _, _ = published
    out = tmp_path / "imported.pt"
    assert main(["import", str(checkpoint), "--arch", "wrn-16-4", "--dataset", "cifar10", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert f"{checkpoint}: not the reference's wrn-16-4-swish with 10 classes: " in error
    assert "layer.0.block.0.conv_0.weight (16, 16, 3, 3) (expected (64, 16, 3, 3))" in error or "another shape" in error
    assert main(["import", str(checkpoint), "--arch", "wrn-16-1", "--dataset", "cifar100", "--out", str(out)]) == 1
    assert "logits.bias (10,) (expected (100,))" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_files_that_are_not_reference_checkpoints_are_refused(tmp_path: Path, capsys) -> None:
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "other.pt")
    (tmp_path / "page.pt").write_text("<html>rate limited</html>")
    for name, problem in (("other.pt", "no 'model_state_dict' of tensors (top-level keys: epoch, optimizer)"),
                          ("page.pt", "unreadable checkpoint")):
        assert main(["import", str(tmp_path / name), "--arch", "wrn-16-1", "--dataset", "cifar10",
                     "--out", str(tmp_path / "out.pt")]) == 1
        assert f"{tmp_path / name}: {problem}" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "other.pt"), "--arch", "wrn-40-2", "--dataset", "cifar10"]) == 2
    assert "--arch wrn-40-2 is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.slow  # AutoAttack, an ONNX export and a server: about a minute on 2 cores
def test_the_imported_model_is_evaluated_exported_and_served_like_a_trained_one(published, tmp_path: Path) -> None:
    checkpoint, source, store = published
    out, onnx = tmp_path / "imported.pt", tmp_path / "imported.onnx"
    result = run_dmat("import", str(checkpoint), "--arch", "wrn-16-1", "--dataset", "cifar10", "--classes-from",
                      str(store), "--out", str(out), "--onnx", str(onnx), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    gates = json.loads(result.stdout)["onnx"]["gates"]
    assert all(gate["passed"] for gate in gates.values()) and gates["parity"]["atol"] == 1e-4

    result = run_dmat("robustness", str(out), "--data", str(store), "--n", "8", "--eps", "8/255", "--version",
                      "custom", "--attacks", "apgd-ce", "--batch-size", "8", "--json", str(tmp_path / "r.json"),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    x, y = first_points(ArrayStore.open(store), 8)
    with torch.no_grad():
        logits = source(x)
    assert report["clean_acc"] == float((logits.argmax(1) == y).double().mean())
    assert report["settings"]["model_kind"] == "dmat-checkpoint"

    with running_server(serve_command(str(onnx)), tmp_path / "serve.log") as (url, _):
        metadata = http_request(url, "GET", "/metadata")[2]
        status, payload = post_json(url, {"inputs": x[:4].numpy().tolist()})
    assert metadata["classes"] == list(CLASS_NAMES["cifar10"])
    assert metadata["lineage"]["imported"]["sha256"] == sha256_file(checkpoint)
    assert metadata["threat"] == {"name": "imported", "norm": "Linf", "eps": 8 / 255}
    assert status == 200, payload
    np.testing.assert_allclose([p["logits"] for p in payload["predictions"]], logits[:4].numpy(), atol=1e-4)
