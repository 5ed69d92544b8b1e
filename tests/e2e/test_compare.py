"""Variants as evidence, end to end: two variants × three seeds through `dvc exp run --queue`, then `dmat compare`,
and the MLflow structure users compare them in (one parent run per pipeline execution, read through the REST API).

The grid's store is the session fixture `variants` (tests/e2e/conftest.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmat.data.store import ArrayStore
from tests.conftest import BIN_DIR
from tests.e2e.conftest import REAL_ONLY
from tests.e2e.test_pipeline import run
from tests.test_team_tracking import key_values, mlflow_server, rest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_compare_tests_the_variants_at_the_seed_level(variants: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare"
    result = run([str(BIN_DIR / "dmat"), "compare", "--experiment", "e2e", "--format", "json", "--out", str(out)],
                 variants)
    table = json.loads(result.stdout)
    rows = {row["variant"]: row for row in table["variants"]}
    assert set(rows) == {"baseline", REAL_ONLY}, rows
    assert rows["baseline"]["seeds"] == rows[REAL_ONLY]["seeds"] == [1, 2, 3]
    assert table["n"] == 30 and table["rows_id"]  # every seed scored on the same test points
    assert table["chance"] == pytest.approx(1 / len(ArrayStore.open(variants / "data/real/test").classes))
    for row in rows.values():
        for kind in ("clean", "robust"):
            accuracy = row[kind]
            low, high = accuracy["t_ci"]
            assert len(accuracy["per_seed"]) == 3 and low <= accuracy["mean"] <= high
    comparisons = {c["metric"]: c for c in table["comparisons"]}
    assert set(comparisons) == {"clean", "robust"}
    for comparison in comparisons.values():
        assert comparison["seeds"] == [1, 2, 3] and len(comparison["differences"]) == 3
        assert 0 <= comparison["p_t"] <= 1 and comparison["p_sign_flip"] >= comparison["p_sign_flip_floor"] == 0.25
        assert comparison["p_holm"] >= comparison["p_t"] and 0 <= comparison["mcnemar_p"] <= 1
    assert {path.name for path in out.iterdir()} == {"compare.md", "compare.csv", "seeds.csv", "comparisons.csv",
                                                     "contrasts.csv", "compare.json", "compare.png"}
    seeds = (out / "seeds.csv").read_text().splitlines()
    assert len(seeds) == 1 + 6 and seeds[0] == "name,variant,seed,n,clean_acc,robust_acc,run_id"
    text = (out / "compare.md").read_text()
    assert f"`{REAL_ONLY}`" in text and "conditional on these trained models" in text

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{variants / 'mlflow.db'}")
    logged = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.`dmat.stage` = 'compare'")
    assert logged and {a.path for a in client.list_artifacts(logged[0].info.run_id)} >= {"compare.md", "seeds.csv",
                                                                                          "compare.png"}


def test_compare_reads_a_grid_back_under_its_variant_names(variants: Path, tmp_path: Path) -> None:
    result = run([str(BIN_DIR / "dmat"), "compare", "--grid", "grid.yaml", "--format", "json", "--no-log",
                  "--out", str(tmp_path)], variants)
    table = json.loads(result.stdout)
    assert [(row["name"], row["variant"], row["seeds"]) for row in table["variants"]] == [
        ("generated", "baseline", [1, 2, 3]), ("real-only", REAL_ONLY, [1, 2, 3])]
    assert [c["name"] for c in table["comparisons"]] == ["real-only", "real-only"]
    assert "**real-only**" in (tmp_path / "compare.md").read_text()


def test_unknown_names_exit_2_naming_them(variants: Path) -> None:
    for option, name in (("--experiment", "no-such-experiment"), ("--dvc-exp", "no-such-exp"),
                         ("--run", "0123456789abcdef")):
        result = run([str(BIN_DIR / "dmat"), "compare", option, name, "--no-log"], variants, expect=2)
        assert name in result.stderr, result.stderr


@pytest.fixture(scope="module")
def server(variants: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The MLflow UI's server on the project's store, as a user opens it."""
    log = tmp_path_factory.mktemp("ui") / "server.log"
    with mlflow_server(f"sqlite:///{variants / 'mlflow.db'}", log) as uri:
        yield uri


def test_the_ui_sees_model_development_and_one_parent_per_pipeline_execution(server: str) -> None:
    experiment = rest(server, "mlflow/experiments/get-by-name", experiment_name="e2e")["experiment"]
    assert key_values(experiment["tags"])["mlflow.experimentKind"] == "custom_model_development"
    found = rest(server, "mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})
    runs = [{"id": r["info"]["run_id"], "name": r["info"]["run_name"], **key_values(r["data"]["tags"])}
            for r in found["runs"]]
    parents = {r["id"]: r for r in runs if r.get("dmat.role") == "pipeline"}
    stages = [r for r in runs if r.get("dmat.stage", "compare") != "compare" and r.get("dmat.role") != "pipeline"]
    assert stages and all(r.get("mlflow.parentRunId") in parents for r in stages), "a stage run without its parent"
    for parent_id, parent in parents.items():  # the children of one parent share its execution and variant
        children = [r for r in stages if r["mlflow.parentRunId"] == parent_id]
        assert children, f"parent {parent['name']} ({parent['dmat.pipeline']}) has no stage runs"
        assert {c["dmat.pipeline"] for c in children} == {parent["dmat.pipeline"]}
        assert {c["dmat.variant"] for c in children} == {parent["dmat.variant"]}
    queued = {p["name"] for p in parents.values() if p["dmat.pipeline"].startswith("exp:")}
    assert len(queued) >= 3 and all(p["dvc.exp_name"] == p["name"] for p in parents.values() if p["name"] in queued)
    assert {p["dmat.variant"] for p in parents.values()} == {"baseline", REAL_ONLY}
