"""Statistics for comparing evaluations (docs/evidence.md): intervals, paired tests over seeds and over test
points, multiple comparisons, power, and the champion rule.

Standard library only (no torch; numpy only inside the bootstrap), so the verify stage, `dmat compare` and
the serving side can all import it.

A claim about a recipe is a claim over training runs, so the seed is the unit of inference:
- Student-t interval of a mean over seeds; paired t-test and the exact sign-flip (permutation) test on
  per-seed paired differences; Holm's step-down adjustment of a table's p-values (Holm 1979); the
  number of seeds a paired t-test needs for a given power (noncentral t); a two-level bootstrap
  (resample seeds, then the test points they share) for an interval that carries both sources of
  variation. The t distribution comes from the regularised incomplete beta function.
- Wilson score interval for a proportion (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it over
  the normal approximation, which collapses to a zero-width interval at 0/n).
- Exact McNemar test (McNemar 1947): two models scored on the same points differ only on the
  discordant ones; under the null hypothesis each discordant point favours either model with
  probability 1/2, so the count favouring one is Binomial(b + c, 1/2). Two-sided p-value: twice the
  smaller tail, capped at 1.
  This answers a narrower question than the seed-level tests: do *these trained models* differ?
- Mean ± sample standard deviation over seeds, and an interval for the seed-averaged accuracy.
- The champion rule: a candidate replaces the champion only on the same threat model, attack suite and
  test rows, and only when it is better by the paired test at level alpha and not significantly worse on
  clean accuracy.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (low, high) for the proportion successes / n at two-sided `confidence`.

    With z the normal quantile for (1 + confidence) / 2 and p = successes / n:
    centre (p + z²/2n) / (1 + z²/n), half-width z·√(p(1 − p)/n + z²/4n²) / (1 + z²/n).
    """
    _check_count(successes, n)
    return _wilson(successes, n, confidence)


def _check_count(successes: float, n: int) -> None:
    if n <= 0:
        raise ValueError(f"n must be a positive count, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n = {n}, got {successes}")


def _wilson(successes: float, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson formula; continuous in `successes`, so a seed-averaged (fractional) count works too."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    p, z2 = successes / n, z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # Exact ends where the interval touches them (round-off would leave e.g. 1e-17 at 0/n).
    return (0.0 if successes == 0 else centre - half, 1.0 if successes == n else centre + half)


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test on paired outcomes: discordant counts and the two-sided p-value."""

    a_only: int  # points where only the first model (a) is correct
    b_only: int  # points where only the second model (b) is correct
    p_value: float


def mcnemar_exact_counts(a_only: int, b_only: int) -> McNemarResult:
    """Exact McNemar test from the discordant counts: p = min(1, 2·P(X ≤ min(a_only, b_only))),
    X ~ Binomial(a_only + b_only, 1/2); p = 1 when there are no discordant points."""
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only} and {b_only}")
    n, smaller = a_only + b_only, min(a_only, b_only)
    term, tail = 1, 0  # C(n, k), built up exactly in integers: no overflow or round-off for large n
    for k in range(smaller + 1):
        tail += term
        term = term * (n - k) // (k + 1)
    return McNemarResult(a_only, b_only, min(1.0, 2 * tail / 2**n))


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemarResult:
    """Exact McNemar test of two models' per-point outcomes on the same points, in the same order."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired outcomes must have the same length, got {len(a_correct)} and {len(b_correct)}")
    a_only = sum(1 for a, b in zip(a_correct, b_correct, strict=True) if a and not b)
    b_only = sum(1 for a, b in zip(a_correct, b_correct, strict=True) if b and not a)
    return mcnemar_exact_counts(a_only, b_only)


@dataclass(frozen=True)
class SeedSummary:
    """A metric over seeds: how many, their mean, and the sample standard deviation (None for one seed)."""

    n_seeds: int
    mean: float
    std: float | None


def mean_std(values: Sequence[float]) -> SeedSummary:
    """Mean and sample (n − 1) standard deviation of one metric over seeds."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return SeedSummary(len(values), statistics.fmean(values),
                       statistics.stdev(values) if len(values) > 1 else None)


def pooled_interval(successes: Sequence[int], n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval for the seed-averaged accuracy when every seed was scored on the same n test points.

    The proportion is the mean over seeds; the count stays n, not n × seeds: the seeds share their
    points, so their outcomes are not independent samples of the test distribution, and counting
    each point once per seed would narrow the interval falsely. Averaging over seeds can only lower
    the per-point variance, so this is conservative for the test-point sampling. It does not contain
    the seed-to-seed (training) variation: report `mean_std` next to it.
    """
    if not successes:
        raise ValueError("pooled_interval needs at least one seed")
    for count in successes:
        _check_count(count, n)
    return _wilson(statistics.fmean(successes), n, confidence)


# ---------------------------------------------------------------------------------------------------------
# Seed-level inference
# ---------------------------------------------------------------------------------------------------------


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (evaluated with the
    modified Lentz method), using the symmetry I_x(a, b) = 1 − I_{1−x}(b, a) where the fraction converges
    slowly (x > (a + 1)/(a + b + 2))."""
    if not 0 <= x <= 1:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0, 1):
        return float(x)
    if x > (a + 1) / (a + b + 2):
        return 1 - _incomplete_beta(1 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom: 1 − I_{df/(df+t²)}(df/2, 1/2)/2 for t ≥ 0."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = _incomplete_beta(df / (df + t * t), df / 2, 0.5) / 2
    return 1 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The t value with P(T ≤ t) = q (bisection on `t_cdf`, to 1e-12 relative)."""
    if not 0 < q < 1:
        raise ValueError(f"q must be between 0 and 1 (exclusive), got {q}")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if t_cdf(middle, df) < q:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


@dataclass(frozen=True)
class MeanInterval:
    """A mean over seeds with its Student-t interval (None for one seed: no spread to estimate)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None


def t_interval(values: Sequence[float], confidence: float = 0.95) -> MeanInterval:
    """Mean of `values` (one per seed) ± t_{(1+confidence)/2, n−1} · s/√n."""
    summary = mean_std(values)
    if summary.std is None:
        return MeanInterval(1, summary.mean, None, None, None)
    half = t_quantile((1 + confidence) / 2, summary.n_seeds - 1) * summary.std / math.sqrt(summary.n_seeds)
    return MeanInterval(summary.n_seeds, summary.mean, summary.std, summary.mean - half, summary.mean + half)


def paired_t_p(differences: Sequence[float]) -> float | None:
    """Two-sided p of the paired t-test that the mean of the per-seed differences is 0 (None below 2 seeds;
    1 when every difference is 0, 0 when they are equal and non-zero: no spread, no doubt)."""
    if len(differences) < 2:
        return None
    summary = mean_std(differences)
    if summary.std == 0:
        return 1.0 if summary.mean == 0 else 0.0
    t = summary.mean / (summary.std / math.sqrt(summary.n_seeds))
    return min(1.0, 2 * (1 - t_cdf(abs(t), summary.n_seeds - 1)))


def sign_flip_p(differences: Sequence[float]) -> float | None:
    """Exact two-sided permutation p of the paired differences: under the null hypothesis each seed's difference
    is as likely to have either sign, so p is the share of the 2^n sign assignments whose mean is at least as far
    from 0 as the observed one. With n seeds it cannot go below 2/2^n (`smallest_sign_flip_p`)."""
    n = len(differences)
    if n == 0:
        return None
    if n > 20:
        raise ValueError(f"the exact sign-flip test enumerates 2^n assignments: {n} seeds is too many (max 20)")
    observed = abs(math.fsum(differences))
    tolerance = 1e-12 * max(1.0, observed)
    extreme = sum(1 for signs in itertools.product((1, -1), repeat=n)
                  if abs(math.fsum(s * d for s, d in zip(signs, differences, strict=True))) >= observed - tolerance)
    return extreme / 2**n


def smallest_sign_flip_p(n_seeds: int) -> float:
    """The smallest two-sided p the exact sign-flip test can give with `n_seeds` seeds (all differences alike)."""
    return min(1.0, 2 / 2**n_seeds)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment: the k-th smallest of m p-values becomes max over j ≤ k of (m − j + 1)·p_(j),
    capped at 1. Controls the family-wise error rate of the whole table; None entries are skipped."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running
    return adjusted


def paired_t_power(n_seeds: int, effect: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with `n_seeds` seeds when the true mean difference is `effect`
    standard deviations of the per-seed differences.

    With c the critical t (df = n − 1), λ = effect·√n and U = √(V/df), V ~ χ²_df, the statistic is
    (Z + λ)/U, so power = E_U[Φ(λ − c·U) + Φ(−λ − c·U)], integrated over U's density by Simpson's rule."""
    if n_seeds < 2:
        raise ValueError(f"a paired t-test needs at least 2 seeds, got {n_seeds}")
    df, normal = n_seeds - 1, statistics.NormalDist()
    critical, shift = t_quantile(1 - alpha / 2, df), abs(effect) * math.sqrt(n_seeds)
    log_norm = math.log(2) + (df / 2) * math.log(df / 2) - math.lgamma(df / 2)

    def integrand(u: float) -> float:
        if u == 0:
            return 0.0
        density = math.exp(log_norm + (df - 1) * math.log(u) - df * u * u / 2)
        return density * (normal.cdf(shift - critical * u) + normal.cdf(-shift - critical * u))

    upper, steps = 1 + 12 / math.sqrt(2 * df) if df > 2 else 12.0, 4000
    width = upper / steps
    total = integrand(0) + integrand(upper) + sum((4 if k % 2 else 2) * integrand(k * width) for k in range(1, steps))
    return min(1.0, total * width / 3)


def seeds_for_power(mean_difference: float, std_difference: float | None, alpha: float = 0.05,
                    power: float = 0.8, limit: int = 1000) -> int | None:
    """The fewest seeds with which a paired t-test at `alpha` detects `mean_difference` with `power`, if the
    per-seed differences spread as `std_difference` does. None when it cannot be said (no spread measured, or
    no difference) or when even `limit` seeds would not do."""
    if std_difference is None or mean_difference == 0:
        return None
    if std_difference == 0:
        return 2
    effect = mean_difference / std_difference
    low, high = 2, 2
    while paired_t_power(high, effect, alpha) < power:
        if high >= limit:
            return None
        low, high = high, min(limit, 2 * high)
    while low < high:  # power rises with n: the first n that reaches it
        middle = (low + high) // 2
        if paired_t_power(middle, effect, alpha) >= power:
            high = middle
        else:
            low = middle + 1
    return high


def two_level_bootstrap(outcomes: Any, baseline: Any | None = None, *, replicates: int = 2000,
                        confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of a seed-averaged accuracy (or, with `baseline`, of the mean paired difference) that
    carries both sources of variation: each replicate resamples the seeds, then the test points.

    `outcomes` (and `baseline`) are seeds × points arrays of per-point correctness, row k of both from seed k,
    every row on the same test points (the seeds share them, so the point resample is the same for every
    seed of a replicate: a crossed design). With no seed-to-seed variation the interval approaches the
    test-point (pooled) interval; with large seed variation and many seeds, the t-interval over seeds."""
    import numpy as np

    values = np.asarray(outcomes, dtype=np.float64)
    if baseline is not None:
        other = np.asarray(baseline, dtype=np.float64)
        if other.shape != values.shape:
            raise ValueError(f"paired outcomes must have the same seeds × points shape, got {values.shape} and "
                             f"{other.shape}")
        values = values - other
    if values.ndim != 2 or min(values.shape) == 0:
        raise ValueError(f"expected a non-empty seeds × points array, got shape {values.shape}")
    n_seeds, n_points = values.shape
    rng = np.random.default_rng(seed)
    means = np.empty(replicates)
    for start in range(0, replicates, 256):  # in blocks: a replicates × points matrix of counts can be large
        block = min(256, replicates - start)
        counts = rng.multinomial(n_points, np.full(n_points, 1 / n_points), size=block)  # points drawn
        per_seed = counts @ values.T / n_points  # block × seeds: each seed's mean on the resampled points
        seeds = rng.integers(0, n_seeds, size=(block, n_seeds))  # seeds drawn
        means[start:start + block] = np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def rows_identity(rows: Sequence[int], test_sha256: str) -> str:
    """Identity of an evaluation's test points: sha256 over the test store's digest and the row indices,
    in order (outcome vectors are paired by position, so the order is part of the identity)."""
    digest = hashlib.sha256(f"{test_sha256}\n".encode())
    digest.update(",".join(str(int(row)) for row in rows).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class EvaluationSummary:
    """What the champion rule needs from one evaluation: its threat model, the attack suite that ran (the
    pyautoattack version, AutoAttack version, attack list, their budgets: `attack_suite`), the identity of its
    test points (`rows_identity`) and its per-point outcomes (True = correct), under attack and on clean inputs.
    A summary without a suite or clean outcomes (an older registration) is not comparable."""

    norm: str
    eps: float
    rows_id: str
    robust_correct: Sequence[bool]
    clean_correct: Sequence[bool] | None = None
    suite: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChampionDecision:
    """The rule's outcome: `moves` (the candidate becomes champion), `stays`, or `refused` (not comparable), with
    both paired tests: robust accuracy (must be significantly better) and clean accuracy (must not be
    significantly worse)."""

    decision: Literal["moves", "stays", "refused"]
    reason: str
    robust: McNemarResult | None = None  # a_only: points only the candidate withstands; b_only: only the champion
    clean: McNemarResult | None = None  # a_only: points only the candidate classifies correctly when clean


def attack_suite(norm: str, eps: float, version: str, attacks: Sequence[str], budgets: dict[str, Any]) -> dict:
    """The identity of an attack suite: what must match for two robust accuracies to be comparable."""
    from importlib import metadata

    try:
        package = metadata.version("pyautoattack")
    except metadata.PackageNotFoundError:
        package = "absent"
    return {"pyautoattack": package, "norm": norm, "eps": round(float(eps), 12), "version": version,
            "attacks": list(attacks), **budgets}


def champion_decision(candidate: EvaluationSummary, champion: EvaluationSummary | None,
                      alpha: float = 0.05) -> ChampionDecision:
    """Whether `candidate` replaces `champion` (docs/evidence.md). It moves when there is no champion, or when
    both were evaluated under the same threat model and attack suite on the same test rows, the candidate
    withstands attacks on significantly more of them (exact McNemar, two-sided p < alpha, more points only it
    withstands), and it is not significantly less accurate on the clean points (the same test). Otherwise
    it stays; evaluations that differ in threat model, attack suite or rows are refused as not comparable.
    Both tests are conditional on these two trained models: the question here is which model to deploy."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1 (exclusive), got {alpha}")
    if champion is None:
        return ChampionDecision("moves", "no champion yet")
    refused = _not_comparable(candidate, champion)
    if refused:
        return ChampionDecision("refused", f"not comparable: {refused}")
    robust = mcnemar_exact(candidate.robust_correct, champion.robust_correct)
    clean = mcnemar_exact(candidate.clean_correct, champion.clean_correct)
    summary = (f"robust: exact McNemar p = {robust.p_value:.4g} ({robust.a_only} points only the candidate "
               f"withstands, {robust.b_only} only the champion); clean: p = {clean.p_value:.4g} ({clean.a_only} vs "
               f"{clean.b_only}); alpha {alpha:g}")
    tests = {"robust": robust, "clean": clean}
    if robust.p_value < alpha and robust.a_only > robust.b_only:
        if clean.p_value < alpha and clean.b_only > clean.a_only:
            return ChampionDecision("stays", f"more robust but significantly less accurate on clean points: "
                                             f"{summary}", **tests)
        return ChampionDecision("moves", f"significantly more robust: {summary}", **tests)
    if robust.p_value < alpha:
        return ChampionDecision("stays", f"significantly less robust: {summary}", **tests)
    return ChampionDecision("stays", f"not significantly more robust: {summary}", **tests)


def _not_comparable(candidate: EvaluationSummary, champion: EvaluationSummary) -> str | None:
    """Why two evaluations cannot be compared point by point, or None when they can."""
    if candidate.norm != champion.norm or not math.isclose(candidate.eps, champion.eps, rel_tol=1e-9, abs_tol=1e-12):
        return (f"threat model {candidate.norm} eps {candidate.eps:.6g} vs the champion's {champion.norm} eps "
                f"{champion.eps:.6g}")
    for name, summary in (("candidate", candidate), ("champion", champion)):
        if summary.suite is None or summary.clean_correct is None:
            return f"the {name} was recorded without its attack suite or clean outcomes"
    differing = sorted(key for key in set(candidate.suite) | set(champion.suite)
                       if candidate.suite.get(key) != champion.suite.get(key))
    if differing:
        return "different attack suites (" + "; ".join(
            f"{key}: {candidate.suite.get(key)!r} vs the champion's {champion.suite.get(key)!r}"
            for key in differing) + ")"
    if candidate.rows_id != champion.rows_id:
        return f"evaluated on different test rows ({candidate.rows_id[:12]} vs the champion's {champion.rows_id[:12]})"
    return None
