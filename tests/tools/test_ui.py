"""`dmat ui`: the views it shares with the MLflow UI, and what a wrong store or experiment is told (the UI in a real
browser is tested end to end in tests/e2e/test_mlflow_ui.py)."""

from __future__ import annotations

from pathlib import Path

from dmat.tools.ui import GROUPED_VIEW, RUNS_VIEW, pipeline_views, view_link
from tests.conftest import run_dmat, write_params


def test_the_views_show_the_headline_columns_the_pipeline_runs_carry_in_a_fixed_order() -> None:
    views = pipeline_views({"pipeline.seconds", "evaluate_l2.robust_acc", "evaluate_linf.robust_acc",
                            "evaluate_linf.robust_acc_ci_low", "evaluate_linf.n", "train.best_val_robust_acc"})
    runs, grouped = views[RUNS_VIEW], views[GROUPED_VIEW]
    assert runs["selectedColumns"] == [
        "metrics.`evaluate_linf.robust_acc`", "metrics.`evaluate_linf.robust_acc_ci_low`",
        "metrics.`evaluate_l2.robust_acc`", "metrics.`train.best_val_robust_acc`",
        "metrics.`pipeline.seconds`", "tags.`dmat.variant`", "tags.`dmat.seed`"]
    assert runs["searchFilter"] == grouped["searchFilter"] == "tags.`dmat.role` = 'pipeline'"
    assert runs["groupBy"] is None
    assert grouped["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "dmat.variant"}]


def test_links_open_the_view_on_model_training_runs() -> None:
    assert view_link("http://127.0.0.1:5000/", "7", RUNS_VIEW) == (
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=dmat-pipelines&workflowType=machine_learning")


def test_a_missing_store_or_experiment_exits_1_naming_it(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", "base: {experiment: nowhere}\n")
    (tmp_path / ".dvc").mkdir()
    result = run_dmat("ui", cwd=tmp_path)
    assert result.returncode == 1 and "mlflow.db" in result.stderr and "does not exist" in result.stderr
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("elsewhere")
    result = run_dmat("ui", cwd=tmp_path)
    assert result.returncode == 1 and "no MLflow experiment named 'nowhere'" in result.stderr, result.stderr


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    assert run_dmat("ui", "--port", "70000", cwd=tmp_path).returncode == 2  # no params.yaml either: usage first
    write_params(tmp_path / "params.yaml", "base: {experiment: x}\n")
    result = run_dmat("ui", "--port", "70000", cwd=tmp_path)
    assert result.returncode == 2 and "--port 70000" in result.stderr
