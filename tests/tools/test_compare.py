"""`dmat compare` on hand-made runs: seeds grouped by variant, seed-level intervals and paired tests over seeds,
Holm over the table, the point-level McNemar as a secondary column, and the files it writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from dmat.core.stats import holm, mcnemar_exact_counts, paired_t_p, sign_flip_p, t_interval
from dmat.tools.compare import compare, contrasts, doc_markers, markdown, publish, table_from_json, write_outputs

N = 100


def evaluation(variant: str, seed: int, robust: int, clean: int, rows_id: str = "rows-a") -> dict:
    return {"run_id": f"{variant}-{seed}", "start_time": seed, "params": {},
            "tags": {"dmat.variant": variant, "dmat.seed": str(seed), "dmat.rows_id": rows_id,
                     "dmat.attacks": "apgd-ce,apgd-t", "dmat.classes": "10"},
            "metrics": {"n": N, "clean_acc": clean / N, "robust_acc": robust / N}}


def first_points(found: dict) -> dict:
    """Outcome vectors where the first accuracy·N points are correct."""
    return {kind: np.arange(N) < round(found["metrics"][f"{kind}_acc"] * N) for kind in ("clean", "robust")}


def no_generated(runs: list[dict]) -> dict:
    return {}


BASE = [(30, 60), (34, 62), (31, 61)]  # (robust, clean) per seed 0, 1, 2
REAL_ONLY = [(20, 58), (22, 59), (24, 57)]


def grid_runs() -> list[dict]:
    return ([evaluation("baseline", seed, *values) for seed, values in enumerate(BASE)]
            + [evaluation("mix.synthetic_fraction=0", seed, *values) for seed, values in enumerate(REAL_ONLY)])


def test_seeds_are_the_unit_of_inference() -> None:
    table = compare(grid_runs(), None, first_points, no_generated)
    assert [row.variant for row in table.variants] == ["baseline", "mix.synthetic_fraction=0"]
    assert table.n == N and table.chance == pytest.approx(0.1) and table.attacks == "APGD-CE + APGD-T"
    base, real_only = table.variants
    assert base.seeds == [0, 1, 2] and base.robust.per_seed == pytest.approx([0.30, 0.34, 0.31])
    expected = t_interval([0.30, 0.34, 0.31])
    assert base.robust.mean == pytest.approx(expected.mean) and base.robust.t_ci == pytest.approx(
        [expected.low, expected.high])
    robust = next(c for c in table.comparisons if c.metric == "robust")
    differences = [-0.10, -0.12, -0.07]
    assert robust.seeds == [0, 1, 2] and robust.differences == pytest.approx(differences)
    assert robust.p_t == pytest.approx(paired_t_p(differences)) and robust.p_sign_flip == pytest.approx(0.25)
    assert robust.p_sign_flip_floor == 0.25  # three seeds cannot give less
    assert robust.bootstrap_ci[0] < robust.mean < robust.bootstrap_ci[1] < 0
    assert robust.seeds_for_power is not None and robust.seeds_for_power >= 2
    # the point-level test, kept as a secondary column: discordant points summed over seeds (10 + 12 + 7, none won)
    assert (robust.only_variant, robust.only_baseline) == (0, 29)
    assert robust.mcnemar_p == pytest.approx(mcnemar_exact_counts(0, 29).p_value)
    clean = next(c for c in table.comparisons if c.metric == "clean")
    assert clean.differences == pytest.approx([-0.02, -0.03, -0.04])  # clean accuracy is tested too
    assert [c.p_holm for c in table.comparisons] == pytest.approx(holm([c.p_t for c in table.comparisons]))
    assert sign_flip_p(clean.differences) == clean.p_sign_flip


def test_the_markdown_leads_with_the_seed_level_test_and_labels_the_point_level_one() -> None:
    text = markdown(compare(grid_runs(), None, first_points, no_generated))
    assert "attacks: APGD-CE + APGD-T" in text and "chance level 10%" in text
    assert "conditional on these trained models" in text
    assert "| `mix.synthetic_fraction=0` | robust | -10.0, -12.0, -7.0 | -9.7 [" in text, text
    assert "0.25 (0.25)" in text  # the sign-flip p at its floor, said so


def test_runs_on_other_test_rows_are_not_paired() -> None:
    runs = [evaluation("baseline", 0, 30, 60), evaluation("other", 0, 40, 60, rows_id="rows-b")]
    table = compare(runs, "baseline", first_points, no_generated)
    assert table.rows_id is None and all(not c.seeds and "different test rows" in c.note for c in table.comparisons)
    assert "NOT the same rows" in markdown(table)


def test_unknown_baseline_mixed_sizes_and_mixed_attack_suites_are_refused() -> None:
    runs = [evaluation("baseline", 0, 30, 60), evaluation("baseline", 1, 30, 60)]
    with pytest.raises(LookupError, match="--baseline 'nope'"):
        compare(runs, "nope", first_points, no_generated)
    runs[1]["tags"]["dmat.attacks"] = "apgd-ce"
    with pytest.raises(LookupError, match="different attack suites"):
        compare(runs, None, first_points, no_generated)
    runs[1]["metrics"]["n"] = 50
    with pytest.raises(LookupError, match="different numbers of test points"):
        compare(runs, None, first_points, no_generated)


def test_files_hold_the_per_seed_values_and_the_tests(tmp_path: Path) -> None:
    table = compare(grid_runs(), None, first_points, no_generated)
    files = write_outputs(table, tmp_path)
    assert {path.name for path in files} == {"compare.md", "compare.json", "compare.csv", "seeds.csv",
                                             "comparisons.csv", "contrasts.csv", "compare.png"}
    with open(tmp_path / "seeds.csv", newline="") as f:
        seeds = list(csv.DictReader(f))
    assert [(row["variant"], row["seed"], float(row["robust_acc"])) for row in seeds][:2] == [
        ("baseline", "0", 0.30), ("baseline", "1", 0.34)]
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["comparisons"][1]["metric"] == "robust" and data["comparisons"][1]["p_t"] == pytest.approx(
        table.comparisons[1].p_t)
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_planned_interaction_is_tested_per_seed() -> None:
    """A 2×2 design (corruption × AT): the interaction, per seed, is (c-at − c-none) − (at − none)."""
    robust = {"at": [30, 32, 31], "none": [29, 30, 30], "c-at": [28, 29, 30], "c-none": [20, 22, 21]}
    runs = [evaluation(variant, seed, value, 60) for variant, values in robust.items()
            for seed, value in enumerate(values)]
    labels = {name: name for name in robust}
    planned = {"interaction": {"c-at": 1, "c-none": -1, "at": -1, "none": 1}}
    clean, robust_row = contrasts(runs, planned, labels, first_points)
    assert (clean.metric, robust_row.metric) == ("clean", "robust") and clean.values == pytest.approx([0, 0, 0])
    assert robust_row.values == pytest.approx([0.07, 0.05, 0.08]) and robust_row.seeds == [0, 1, 2]
    assert robust_row.p_t == pytest.approx(paired_t_p([0.07, 0.05, 0.08]))
    assert robust_row.p_holm == pytest.approx(holm([clean.p_t, robust_row.p_t])[1])
    low, high = robust_row.bootstrap_ci
    assert low <= robust_row.mean <= high


def test_a_docs_page_publishes_the_tables_and_json_reads_back(tmp_path: Path) -> None:
    table = compare(grid_runs(), None, first_points, no_generated)
    out = tmp_path / "results"
    write_outputs(table, out)
    assert table_from_json(json.loads((out / "compare.json").read_text())) == table
    begin, end = doc_markers(out)
    page = tmp_path / "page.md"
    page.write_text(f"# Result\n\nBefore.\n{begin}\nstale\n{end}\nAfter.\n")
    publish(page, out, markdown(table))
    assert page.read_text() == f"# Result\n\nBefore.\n{begin}\n{markdown(table)}{end}\nAfter.\n"
    with pytest.raises(LookupError, match="has no lines"):
        publish(tmp_path / "page.md", tmp_path / "other", markdown(table))
