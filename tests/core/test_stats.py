"""Wilson intervals, exact McNemar, seed-level inference (t, sign-flip, Holm, power, two-level bootstrap) and the
champion rule against scipy or hand-computed values."""

import math
import subprocess
import sys

import numpy as np
import pytest

from dmat.core.stats import (
    EvaluationSummary,
    attack_suite,
    champion_decision,
    holm,
    mcnemar_exact,
    mcnemar_exact_counts,
    mean_std,
    paired_t_p,
    paired_t_power,
    pooled_interval,
    rows_identity,
    seeds_for_power,
    sign_flip_p,
    smallest_sign_flip_p,
    t_cdf,
    t_interval,
    t_quantile,
    two_level_bootstrap,
    wilson_interval,
)

Z2 = 1.959963984540054**2  # z² of the two-sided 95% normal quantile


@pytest.mark.parametrize(("successes", "n", "expected"), [
    # 0/10: centre = half-width = (z²/20)/(1 + z²/10), so the upper end is (z²/10)/(1 + z²/10).
    (0, 10, (0.0, (Z2 / 10) / (1 + Z2 / 10))),
    # 5/10: centre 1/2, half-width z·√(1/40 + z²/400)/(1 + z²/10) = 0.263406...
    (5, 10, (0.236594, 0.763406)),
    # 81/100: centre (0.81 + z²/200)/(1 + z²/100) = 0.798532, half-width z·√(0.001539 + z²/40000)/(1 + z²/100).
    (81, 100, (0.722210, 0.874854)),
    (10, 10, (1 - (Z2 / 10) / (1 + Z2 / 10), 1.0)),
])
def test_wilson_interval_known_values(successes: int, n: int, expected: tuple[float, float]) -> None:
    low, high = wilson_interval(successes, n)
    # abs 5e-6: the hand sums above carry six digits
    assert low == pytest.approx(expected[0], abs=5e-6) and high == pytest.approx(expected[1], abs=5e-6)


def test_wilson_interval_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for successes, n in [(0, 10), (5, 10), (81, 100), (637, 1000), (1, 3)]:
        for confidence in (0.9, 0.95, 0.99):
            ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
            assert wilson_interval(successes, n, confidence) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_interval_width_at_the_sizes_design_quotes() -> None:
    """docs/evidence.md: about ±9 points at n = 100 and ±3 at n = 1,000 (at p = 0.6)."""
    for n, half_width in [(100, 0.095), (1000, 0.031)]:
        low, high = wilson_interval(int(0.6 * n), n)
        assert (high - low) / 2 == pytest.approx(half_width, abs=0.002)


@pytest.mark.parametrize(("successes", "n", "confidence"), [(1, 0, 0.95), (-1, 10, 0.95), (11, 10, 0.95),
                                                            (5, 10, 1.0), (5, 10, 0.0)])
def test_wilson_interval_rejects_bad_input(successes: int, n: int, confidence: float) -> None:
    with pytest.raises(ValueError, match="n|successes|confidence"):
        wilson_interval(successes, n, confidence)


@pytest.mark.parametrize(("a_only", "b_only", "p_value"), [
    (0, 5, 2 / 32),  # 2·P(X ≤ 0), X ~ Bin(5, 1/2)
    (1, 9, 2 * (1 + 10) / 1024),  # 2·(C(10,0) + C(10,1))/2^10
    (8, 2, 2 * (1 + 10 + 45) / 1024),
    (3, 3, 1.0),  # 2·42/64 > 1: capped
    (0, 0, 1.0),  # no discordant points: no evidence either way
])
def test_mcnemar_exact_known_p_values(a_only: int, b_only: int, p_value: float) -> None:
    result = mcnemar_exact_counts(a_only, b_only)
    assert (result.a_only, result.b_only) == (a_only, b_only)
    assert result.p_value == pytest.approx(p_value, rel=1e-12)


def test_mcnemar_exact_counts_discordant_pairs_only() -> None:
    a = [True, True, False, False, True, True, True]
    b = [True, False, False, True, False, False, True]
    result = mcnemar_exact(a, b)
    assert (result.a_only, result.b_only) == (3, 1)
    assert result.p_value == pytest.approx(2 * (1 + 4) / 16)
    with pytest.raises(ValueError, match="same length"):
        mcnemar_exact(a, b[:-1])


def test_mcnemar_exact_agrees_with_scipy_and_stays_exact_for_large_counts() -> None:
    stats = pytest.importorskip("scipy.stats")
    for a_only, b_only in [(7, 19), (40, 61), (480, 520), (3000, 3200)]:
        expected = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
        assert mcnemar_exact_counts(a_only, b_only).p_value == pytest.approx(expected, rel=1e-9)
    # Integer arithmetic to the last division: 2·2^-1000 is exact, where float binomial terms would underflow.
    assert mcnemar_exact_counts(0, 1000).p_value == 2.0**-999


def test_mean_std_over_seeds() -> None:
    summary = mean_std([0.40, 0.44, 0.42])
    assert summary.n_seeds == 3 and summary.mean == pytest.approx(0.42)
    assert summary.std == pytest.approx(0.02)  # sample std: √((0.02² + 0.02² + 0)/2)
    assert mean_std([0.5]).std is None
    with pytest.raises(ValueError):
        mean_std([])


def test_pooled_interval_counts_shared_points_once() -> None:
    # Three seeds on the same 100 points, 40, 44 and 42 correct: the interval of 42/100, not of 126/300.
    assert pooled_interval([40, 44, 42], 100) == pytest.approx(wilson_interval(42, 100))
    low, high = pooled_interval([40, 45], 100)  # mean 42.5: between the Wilson intervals of 42 and 43
    assert wilson_interval(42, 100)[0] < low < wilson_interval(43, 100)[0]
    with pytest.raises(ValueError, match="successes"):
        pooled_interval([40, 101], 100)


ROWS = rows_identity(range(100), "ab" * 32)
SUITE = attack_suite("Linf", 8 / 255, "custom", ["apgd-ce", "apgd-t"], {"square_queries": None, "pgd_steps": 0})


def _summary(correct: int, *, norm: str = "Linf", eps: float = 8 / 255, rows: str = ROWS, flipped: int = 0,
             clean: int = 80, suite: dict | None = SUITE) -> EvaluationSummary:
    """100 points: the first `correct` withstand the attack; `flipped` later ones too, with as many
    of the first ones lost (same accuracy, other points); the first `clean` are classified correctly."""
    outcome = [i < correct for i in range(100)]
    for i in range(flipped):
        outcome[i], outcome[correct + i] = False, True
    return EvaluationSummary(norm, eps, rows, outcome, [i < clean for i in range(100)], suite)


def test_champion_moves_when_significantly_better_on_the_same_rows() -> None:
    decision = champion_decision(_summary(60), _summary(45))  # 15 discordant, all for the candidate
    assert decision.decision == "moves"
    assert (decision.robust.a_only, decision.robust.b_only) == (15, 0)
    assert decision.robust.p_value == pytest.approx(2 / 2**15)
    assert decision.clean.p_value == 1.0 and "McNemar" in decision.reason


def test_champion_stays_when_the_difference_is_not_significant() -> None:
    # 52 vs 50 correct, but 12 vs 10 discordant points: p = 0.83.
    decision = champion_decision(_summary(52, flipped=10), _summary(50))
    assert decision.decision == "stays" and "not significantly" in decision.reason
    assert (decision.robust.a_only, decision.robust.b_only) == (12, 10)
    assert decision.robust.p_value == pytest.approx(mcnemar_exact_counts(12, 10).p_value)
    worse = champion_decision(_summary(45), _summary(60))
    assert worse.decision == "stays" and "less robust" in worse.reason


def test_champion_stays_when_the_candidate_is_significantly_less_accurate_on_clean_points() -> None:
    decision = champion_decision(_summary(60, clean=62), _summary(45, clean=80))  # 18 clean points lost, none won
    assert decision.decision == "stays" and "less accurate on clean" in decision.reason
    assert (decision.clean.a_only, decision.clean.b_only) == (0, 18)
    assert decision.clean.p_value == pytest.approx(2 / 2**18)
    # a clean loss that is not significant does not stop it
    assert champion_decision(_summary(60, clean=78), _summary(45, clean=80)).decision == "moves"


def test_champion_rule_refuses_other_rows_threat_models_or_attack_suites() -> None:
    other_rows = rows_identity(range(1, 101), "ab" * 32)
    other_store = rows_identity(range(100), "cd" * 32)
    standard = attack_suite("Linf", 8 / 255, "standard", ["apgd-ce", "apgd-t", "fab-t", "square"],
                            {"square_queries": 5000, "pgd_steps": 0})
    more_queries = {**SUITE, "square_queries": 100}
    for candidate, words in [(_summary(90, rows=other_rows), "rows"), (_summary(90, rows=other_store), "rows"),
                             (_summary(90, eps=4 / 255), "threat"), (_summary(90, norm="L2", eps=8 / 255), "threat"),
                             (_summary(90, suite=standard), "attack suites (attacks: ['apgd-ce', 'apgd-t', 'fab-t'"),
                             (_summary(90, suite=more_queries), "square_queries: 100 vs the champion's None"),
                             (_summary(90, suite=None), "without its attack suite")]:
        decision = champion_decision(candidate, _summary(10))
        assert decision.decision == "refused" and "not comparable" in decision.reason, decision.reason
        assert words in decision.reason and decision.robust is None


def test_first_candidate_moves_without_a_champion() -> None:
    decision = champion_decision(_summary(10), None)
    assert decision.decision == "moves" and decision.robust is None


def test_rows_identity_depends_on_rows_their_order_and_the_store() -> None:
    assert rows_identity([0, 1, 2], "s") == rows_identity((0, 1, 2), "s")
    assert len({rows_identity([0, 1, 2], "s"), rows_identity([0, 2, 1], "s"), rows_identity([0, 1, 2], "t"),
                rows_identity([0, 12], "s"), rows_identity([0, 1, 2, 3], "s")}) == 5


def test_stats_module_does_not_import_torch() -> None:
    code = "import sys, dmat.core.stats; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_alpha_must_be_a_level() -> None:
    with pytest.raises(ValueError, match="alpha"):
        champion_decision(_summary(10), _summary(10), alpha=0)
    assert math.isclose(champion_decision(_summary(60), _summary(45), alpha=0.5).robust.p_value, 2 / 2**15)


# --- seed-level inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 30, 200])
def test_t_distribution_agrees_with_scipy(df: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    for t in (-12.0, -3.0, -0.5, 0.0, 0.7, 2.1, 10.0):
        assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)
    for q in (0.001, 0.025, 0.5, 0.9, 0.975, 0.999):
        assert t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9, abs=1e-12)


def test_t_interval_by_hand() -> None:
    # mean 0.42, s = 0.02, t_{0.975, 2} = 4.302653: half-width 4.302653·0.02/√3 = 0.049683
    result = t_interval([0.40, 0.44, 0.42])
    assert (result.n, result.mean, result.std) == (3, pytest.approx(0.42), pytest.approx(0.02))
    assert (result.low, result.high) == (pytest.approx(0.42 - 0.049683, abs=1e-6),
                                         pytest.approx(0.42 + 0.049683, abs=1e-6))
    assert t_interval([0.5]).low is None  # one seed: no spread, no interval


def test_paired_t_and_sign_flip_agree_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for differences in ([0.01, -0.02, 0.05, 0.03], [0.1, 0.12, 0.08], [-0.03, -0.01, -0.02, -0.05, 0.004]):
        assert paired_t_p(differences) == pytest.approx(stats.ttest_1samp(differences, 0).pvalue, rel=1e-9)
        exact = stats.permutation_test((np.array(differences),), np.mean, permutation_type="samples",
                                       n_resamples=np.inf).pvalue
        assert sign_flip_p(differences) == pytest.approx(exact, rel=1e-12)


def test_sign_flip_floor_and_degenerate_cases() -> None:
    assert sign_flip_p([0.02, 0.03, 0.01]) == smallest_sign_flip_p(3) == 0.25  # all alike: 2 of 8 assignments
    assert smallest_sign_flip_p(5) == 0.0625
    assert paired_t_p([0.02]) is None and sign_flip_p([]) is None
    assert paired_t_p([0.0, 0.0, 0.0]) == 1.0 and paired_t_p([0.01, 0.01]) == 0.0


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04, 0.5 (m = 4): 0.04, 0.09, max(0.09, 0.08), 0.5
    assert holm([0.01, 0.04, 0.03, None, 0.5]) == pytest.approx([0.04, 0.09, 0.09, None, 0.5])
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_power_agrees_with_the_noncentral_t_and_seeds_are_the_fewest_that_reach_it() -> None:
    stats = pytest.importorskip("scipy.stats")
    for n, effect in [(3, 1.0), (5, 0.8), (10, 0.5), (4, 3.0)]:
        critical = stats.t.ppf(0.975, n - 1)
        exact = stats.nct.sf(critical, n - 1, effect * n**0.5) + stats.nct.cdf(-critical, n - 1, effect * n**0.5)
        assert paired_t_power(n, effect) == pytest.approx(exact, abs=1e-8)
    needed = seeds_for_power(0.026, 0.03)
    assert paired_t_power(needed, 0.026 / 0.03) >= 0.8 > paired_t_power(needed - 1, 0.026 / 0.03)
    assert seeds_for_power(0.0, 0.03) is None and seeds_for_power(0.02, None) is None


def test_two_level_bootstrap_without_seed_variation_is_the_test_point_interval() -> None:
    rng = np.random.default_rng(0)
    row = rng.random(1000) < 0.6
    low, high = two_level_bootstrap(np.tile(row, (5, 1)))  # five seeds with identical outcomes
    wilson = wilson_interval(int(row.sum()), 1000)
    assert low == pytest.approx(wilson[0], abs=0.006) and high == pytest.approx(wilson[1], abs=0.006)


def test_two_level_bootstrap_with_large_seed_variation_approaches_the_t_interval() -> None:
    rng = np.random.default_rng(1)
    accuracies = np.clip(rng.normal(0.5, 0.1, size=30), 0.05, 0.95)
    outcomes = np.stack([rng.random(2000) < a for a in accuracies])
    low, high = two_level_bootstrap(outcomes)
    seeds = t_interval(outcomes.mean(axis=1).tolist())
    assert low == pytest.approx(seeds.low, abs=0.008) and high == pytest.approx(seeds.high, abs=0.008)
    # and it is wider than the interval the test points alone would give
    pooled = wilson_interval(int(outcomes.mean(axis=0).sum().round()), 2000)
    assert high - low > 1.25 * (pooled[1] - pooled[0])


def test_two_level_bootstrap_of_a_paired_difference() -> None:
    a = np.array([[1, 1, 0, 1], [1, 0, 0, 1]], dtype=bool)
    low, high = two_level_bootstrap(a, a)
    assert low == high == 0.0  # identical variants: the difference is 0 in every replicate
    with pytest.raises(ValueError, match="same seeds × points shape"):
        two_level_bootstrap(a, a[:1])
