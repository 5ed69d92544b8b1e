"""The known-distribution benchmark end to end at tiny size: a grid of two AT modes × two seeds through `dmat queue`
and `dmat known-distribution report`, with MLflow's parent/child runs, then `dvc repro` of its own dvc.yaml."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dmat.known_distribution_config import PIPELINE_DIR
from tests.conftest import BIN_DIR
from tests.e2e.test_pipeline import copy_project, run
from tests.test_known_distribution_pipeline import tiny_params

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

GRID = f"""pipeline: {PIPELINE_DIR}/dvc.yaml
profile: {PIPELINE_DIR}/params.yaml
name: kdt
seeds: [0, 1]
axes:
  mode: {{none: {{}}, adversarial: {{train.adversarial.mode: adversarial}}}}
  condition: {{clean: {{}}}}
"""


def test_the_benchmark_queues_reproduces_and_reports(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    (project / PIPELINE_DIR / "params.yaml").write_text(tiny_params(experiment="kd-e2e", steps=20))
    (project / "grid.yaml").write_text(GRID)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny benchmark"]):
        run(command, project)

    # A new project: two workers start at once on a tracking store that `dmat queue` has just created.
    run([str(BIN_DIR / "dmat"), "queue", "grid.yaml", "--start", "2", "--watch"], project)
    out = project / "reports" / "kd"
    run([str(BIN_DIR / "dmat"), "known-distribution", "report", "--grid", "grid.yaml", "--out", str(out)], project)
    with (out / "per_seed.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("adversarial-clean", "0"), ("adversarial-clean", "1"),
                                                                ("none-clean", "0"), ("none-clean", "1")]
    with (out / "summary.csv").open() as handle:
        summary = [r for r in csv.DictReader(handle) if r["metric"] == "attack_displacement"]
    assert [(r["value"], r["seeds"]) for r in summary] == [("adversarial", "2")]
    assert (out / "samples_ring.png").stat().st_size > 0 and "(d) resilience" in (out / "summary.md").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kd-e2e").experiment_id], max_results=100)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("dmat.role") == "pipeline"}
    stages = [r for r in runs if r.data.tags.get("dmat.role") != "pipeline"]
    assert len(parents) == 4  # one per queued experiment, each with its stage runs as children
    assert sorted(r.data.tags["dmat.stage"] for r in stages) == ["kd-evaluate@ring"] * 4 + ["kd-train@ring"] * 4
    assert all(r.data.tags["mlflow.parentRunId"] in parents for r in stages)
    labels = {r.data.tags["dmat.variant"] for r in parents.values()}
    assert labels == {"baseline", 'train.adversarial.mode="adversarial"'}

    # The committed params (mode none, seed 0) are the first experiment's: `dvc repro` restores its outputs from
    # DVC's run cache instead of training again.
    result = run([str(BIN_DIR / "dvc"), "repro", f"{PIPELINE_DIR}/dvc.yaml"], project)
    assert "Running stage" not in result.stdout, result.stdout
    pipeline = project / PIPELINE_DIR
    metrics = json.loads((pipeline / "metrics" / "evaluate_ring.json").read_text())
    assert metrics["sliced_w2_true"] > 0 and 0 <= metrics["memorisation_rate"] <= 1
    assert (pipeline / "plots" / "ring" / "samples.png").stat().st_size > 0
    assert "sigma,error,optimal_mse" in (pipeline / "plots" / "ring" / "denoiser_error.csv").read_text()
