"""Registry aliases: `candidate` always moves; `champion` only to an at-least-as-robust model of the same threat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dmat.config import parse_params
from dmat.stages.verify import champion_decision
from dmat.stages.verify import register as register_version
from dmat.tracking import stage_run
from tests.deploy.helpers import save_tiny_classifier

LINF = {"norm": "Linf", "eps": 8 / 255}


def register(tmp_path: Path, model: Path, robust: float, threat: dict = LINF) -> dict:
    params = parse_params({"base": {"experiment": "registry-test"}})
    example = np.zeros((1, 3, 8, 8), dtype=np.float32)
    with stage_run("verify", params, ("base",)) as tracked:
        return register_version(tracked, model, "tiny", example, np.zeros((1, 3), dtype=np.float32),
                                {**threat, "robust_accuracy": robust, "clean_accuracy": 0.9})


@pytest.mark.slow
def test_champion_moves_only_to_a_model_at_least_as_robust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()  # a project root: the store is tmp_path/mlflow.db
    model = save_tiny_classifier(tmp_path / "tiny.onnx")
    first = register(tmp_path, model, 0.40)
    assert first["version"] == "1" and first["champion_moved"] and first["reason"] == "no champion yet"
    weaker = register(tmp_path, model, 0.35)
    assert weaker["aliases"] == ["candidate"] and "champion kept" in weaker["reason"]
    other_threat = register(tmp_path, model, 0.90, {"norm": "L2", "eps": 0.5})
    assert not other_threat["champion_moved"] and "not comparable" in other_threat["reason"]
    equal = register(tmp_path, model, 0.40)
    assert equal["champion_moved"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == equal["version"] == "4"
    assert str(client.get_model_version_by_alias("tiny", "candidate").version) == "4"
    assert client.get_model_version("tiny", "2").tags["dmat.robust_accuracy"] == "0.35"


def test_champion_decision_rules() -> None:
    assert champion_decision({**LINF, "robust_accuracy": 0.3}, None) == (True, "no champion yet")
    current = {"norm": "Linf", "eps": str(8 / 255), "robust_accuracy": "0.5", "version": "3"}
    assert champion_decision({**LINF, "robust_accuracy": 0.5}, current)[0]
    assert not champion_decision({**LINF, "robust_accuracy": 0.49}, current)[0]
    assert not champion_decision({"norm": "Linf", "eps": 4 / 255, "robust_accuracy": 0.9}, current)[0]
