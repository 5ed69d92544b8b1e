"""`dmat compare` on hand-made runs: seeds grouped by variant, mean ± std, pooled intervals, the paired test."""

from __future__ import annotations

import numpy as np
import pytest

from dmat.core.stats import mcnemar_exact_counts, pooled_interval
from dmat.tools.compare import compare, markdown

N = 100


def evaluation(variant: str, seed: int, robust: int, clean: int, rows_id: str = "rows-a") -> dict:
    return {"run_id": f"{variant}-{seed}", "start_time": seed, "params": {},
            "tags": {"dmat.variant": variant, "dmat.seed": str(seed), "dmat.rows_id": rows_id},
            "metrics": {"n": N, "clean_acc": clean / N, "robust_acc": robust / N}}


def first_robust(found: dict) -> np.ndarray:
    """Outcome vectors where the first robust_acc·N points withstand the attack."""
    return np.arange(N) < round(found["metrics"]["robust_acc"] * N)


def no_generated(runs: list[dict]) -> dict:
    return {}


def test_seeds_group_by_variant_with_mean_std_pooled_interval_and_paired_p_value() -> None:
    runs = [evaluation("baseline", 0, 30, 60), evaluation("baseline", 1, 34, 62),
            evaluation("mix.synthetic_fraction=0", 0, 20, 58), evaluation("mix.synthetic_fraction=0", 1, 22, 59)]
    rows = compare(runs, None, first_robust, no_generated)
    assert [row.variant for row in rows] == ["baseline", "mix.synthetic_fraction=0"]
    base, real_only = rows
    assert base.seeds == [0, 1] and base.n == N and base.note == "baseline" and base.p_value is None
    assert base.robust_mean == pytest.approx(0.32) and base.robust_std == pytest.approx(np.std([0.30, 0.34], ddof=1))
    assert base.robust_pooled_ci == pytest.approx(list(pooled_interval([30, 34], N)))
    # Seed 0: 10 points only the baseline withstands; seed 1: 12. None only the variant: exact McNemar on 0 vs 22.
    assert (real_only.paired_seeds, real_only.only_variant, real_only.only_baseline) == (2, 0, 22)
    assert real_only.p_value == pytest.approx(mcnemar_exact_counts(0, 22).p_value)
    table = markdown(rows)
    assert "`mix.synthetic_fraction=0`" in table and "32.0 ± 2.8" in table


def test_runs_on_other_test_rows_are_not_paired() -> None:
    runs = [evaluation("baseline", 0, 30, 60), evaluation("other", 0, 40, 60, rows_id="rows-b")]
    other = compare(runs, "baseline", first_robust, no_generated)[1]
    assert other.p_value is None and other.paired_seeds == 0 and "different test rows" in other.note


def test_an_unknown_baseline_and_mixed_test_sizes_are_refused() -> None:
    runs = [evaluation("baseline", 0, 30, 60), evaluation("baseline", 1, 30, 60)]
    with pytest.raises(LookupError, match="--baseline 'nope'"):
        compare(runs, "nope", first_robust, no_generated)
    runs[1]["metrics"]["n"] = 50
    with pytest.raises(LookupError, match="different numbers of test points"):
        compare(runs, None, first_robust, no_generated)
