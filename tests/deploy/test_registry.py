"""Registry aliases: `candidate` always moves; `champion` only by evidence (verify's rule, core.stats)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dmat.config import parse_params
from dmat.core.stats import EvaluationSummary, attack_suite, rows_identity
from dmat.stages.verify import register as register_version
from dmat.stages.verify import unpack_outcomes
from dmat.tracking import stage_run
from tests.deploy.helpers import save_tiny_classifier

N = 200
ROWS = rows_identity(range(N), "test-store-digest")
LINF = {"norm": "Linf", "eps": 8 / 255}
BUDGETS = {"square_queries": None, "pgd_steps": 0, "pgd_restarts": None}


def outcomes(robust: int) -> np.ndarray:
    """The first `robust` of N points withstand the attack: two such vectors differ only on the points between."""
    return np.arange(N) < robust


def register(model: Path, robust: int, threat: dict = LINF, rows_id: str = ROWS, clean: int = 180,
             attacks: tuple[str, ...] = ("apgd-ce", "apgd-t")) -> dict:
    params = parse_params({"base": {"experiment": "registry-test"}, "verify": {"registered_model": "tiny"}})
    example = np.zeros((1, 3, 8, 8), dtype=np.float32)
    card = {**threat, "robust_accuracy": robust / N, "clean_accuracy": clean / N, "n": N}
    suite = attack_suite(threat["norm"], threat["eps"], "custom", attacks, BUDGETS)
    candidate = EvaluationSummary(threat["norm"], threat["eps"], rows_id, outcomes(robust), outcomes(clean), suite)
    with stage_run("verify", params, ("base",)) as tracked:
        return register_version(tracked, model, params.verify, example, np.zeros((1, 3), dtype=np.float32), card,
                                candidate)


@pytest.mark.slow
def test_champion_moves_only_by_a_significant_paired_improvement(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()  # a project root: the store is tmp_path/mlflow.db
    model = save_tiny_classifier(tmp_path / "tiny.onnx")
    first = register(model, 80)
    assert first["version"] == "1" and first["champion_moved"] and first["reason"] == "no champion yet"
    slightly_better = register(model, 84)  # 4 discordant points, all for the candidate: p = 0.125
    assert not slightly_better["champion_moved"] and "not significantly more robust" in slightly_better["reason"]
    assert slightly_better["champion_rule"]["robust_p_value"] == pytest.approx(0.125)
    other_threat = register(model, 190, {"norm": "L2", "eps": 0.5})
    assert not other_threat["champion_moved"] and other_threat["champion_rule"]["decision"] == "refused"
    other_rows = register(model, 190, rows_id=rows_identity(range(1, N + 1), "test-store-digest"))
    assert other_rows["champion_rule"]["decision"] == "refused" and "different test rows" in other_rows["reason"]
    weaker_attacks = register(model, 190, attacks=("apgd-ce",))  # scored by APGD-CE alone: not comparable
    assert weaker_attacks["champion_rule"]["decision"] == "refused" and "attack suites" in weaker_attacks["reason"]
    clean_loss = register(model, 100, clean=150)  # more robust, but 30 clean points lost and none won
    assert not clean_loss["champion_moved"] and "less accurate on clean" in clean_loss["reason"]
    better = register(model, 100)  # 20 points only it withstands, none only the champion: p ≈ 2e-6
    assert better["champion_moved"] and better["champion_rule"]["robust_p_value"] < 0.05
    assert better["champion_rule"]["clean_p_value"] == 1.0

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == better["version"] == "7"
    assert str(client.get_model_version_by_alias("tiny", "candidate").version) == "7"
    tags = client.get_model_version("tiny", "2").tags
    assert tags["dmat.champion_rule.decision"] == "stays" and tags["dmat.champion_rule.compared_with_version"] == "1"
    assert float(tags["dmat.champion_rule.robust_p_value"]) == pytest.approx(0.125)
    assert unpack_outcomes(tags["dmat.robust_outcomes"], N).tolist() == outcomes(84).tolist()
    assert unpack_outcomes(tags["dmat.clean_outcomes"], N).tolist() == outcomes(180).tolist()
    assert float(client.get_model_version("tiny", "6").tags["dmat.champion_rule.clean_p_value"]) < 0.05
