"""docs/experiments/cpu-scale.md quotes the committed results of the CPU-scale grid, and a reader can check them:
the page's tables are `compare.json` rendered, and every seed-level number follows from the per-seed values in
`seeds.csv` (the bootstrap intervals and the point-level McNemar need the per-point outcomes, which stay in MLflow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dmat.core import stats
from dmat.tools.compare import doc_markers, markdown, table_from_json
from dmat.tools.grid import load_grid

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("experiments/results/cpu-scale")


@pytest.fixture(scope="module")
def table():
    path = REPO_ROOT / RESULTS / "compare.json"
    if not path.is_file():
        pytest.skip("no committed results of the CPU-scale grid")
    return table_from_json(json.loads(path.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def per_seed() -> dict[tuple[str, int], dict[str, float]]:
    with (REPO_ROOT / RESULTS / "seeds.csv").open(encoding="utf-8") as handle:
        return {(row["name"], int(row["seed"])): {"clean": float(row["clean_acc"]), "robust": float(row["robust_acc"])}
                for row in csv.DictReader(handle)}


def test_the_page_quotes_the_committed_tables(table) -> None:
    page = (REPO_ROOT / "docs/experiments/cpu-scale.md").read_text(encoding="utf-8")
    begin, end = doc_markers(RESULTS)
    assert page.split(begin, 1)[1].split(end, 1)[0] == f"\n{markdown(table)}"
    assert (REPO_ROOT / RESULTS / "compare.md").read_text(encoding="utf-8") == markdown(table)


def test_the_results_cover_the_grid_on_one_set_of_test_points(table, per_seed) -> None:
    grid = load_grid(REPO_ROOT / "experiments/cpu-scale.yaml", REPO_ROOT)
    assert {name for name, _ in per_seed} == set(grid.variants)
    assert all(row.seeds == list(grid.seeds) for row in table.variants)
    assert table.rows_id is not None and table.attacks == "APGD-CE + APGD-T"


def test_each_variant_summarises_its_per_seed_values(table, per_seed) -> None:
    for row in table.variants:
        for metric, accuracy in (("clean", row.clean), ("robust", row.robust)):
            values = [per_seed[row.name, seed][metric] for seed in row.seeds]
            assert accuracy.per_seed == pytest.approx(values)
            interval = stats.t_interval(values)
            assert accuracy.mean == pytest.approx(interval.mean)
            assert accuracy.t_ci == pytest.approx([interval.low, interval.high])


def test_each_comparison_follows_from_the_per_seed_values(table, per_seed) -> None:
    baseline = table.variants[0].name
    for comparison in table.comparisons:
        differences = [per_seed[comparison.name, seed][comparison.metric] - per_seed[baseline, seed][comparison.metric]
                       for seed in comparison.seeds]
        assert comparison.differences == pytest.approx(differences)
        interval = stats.t_interval(differences)
        assert comparison.t_ci == pytest.approx([interval.low, interval.high])
        assert comparison.p_t == pytest.approx(stats.paired_t_p(differences))
        assert comparison.p_sign_flip == pytest.approx(stats.sign_flip_p(differences))
    assert [c.p_holm for c in table.comparisons] == pytest.approx(stats.holm([c.p_t for c in table.comparisons]))


def test_each_planned_contrast_follows_from_the_per_seed_values(table, per_seed) -> None:
    grid = load_grid(REPO_ROOT / "experiments/cpu-scale.yaml", REPO_ROOT)
    assert {c.name for c in table.contrasts} == set(grid.contrasts)
    for contrast in table.contrasts:
        assert contrast.weights == grid.contrasts[contrast.name]
        values = [sum(weight * per_seed[variant, seed][contrast.metric] for variant, weight in contrast.weights.items())
                  for seed in contrast.seeds]
        assert contrast.values == pytest.approx(values)
        assert contrast.p_t == pytest.approx(stats.paired_t_p(values))
    assert [c.p_holm for c in table.contrasts] == pytest.approx(stats.holm([c.p_t for c in table.contrasts]))
