"""Statistics for comparing evaluations (DESIGN.md §8): intervals, the paired exact test, seeds, the champion rule.

Standard library only (no torch, no numpy), so the verify stage, `dmat compare` and the serving side
can all import it.
- Wilson score interval for a proportion (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it over
  the normal approximation, which collapses to a zero-width interval at 0/n).
- Exact McNemar test (McNemar 1947): two models scored on the same points differ only on the
  discordant ones; under the null hypothesis each discordant point favours either model with
  probability 1/2, so the count favouring one is Binomial(b + c, 1/2). Two-sided p-value: twice the
  smaller tail, capped at 1.
- Mean ± sample standard deviation over seeds, and an interval for the seed-averaged accuracy.
- The champion rule: a candidate replaces the champion only on the same threat model and test rows,
  and only when it is better by the paired test at level alpha.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


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


def rows_identity(rows: Sequence[int], test_sha256: str) -> str:
    """Identity of an evaluation's test points: sha256 over the test store's digest and the row indices,
    in order (outcome vectors are paired by position, so the order is part of the identity)."""
    digest = hashlib.sha256(f"{test_sha256}\n".encode())
    digest.update(",".join(str(int(row)) for row in rows).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class EvaluationSummary:
    """What the champion rule needs from one evaluation: its threat model, the identity of its test
    points (`rows_identity`) and its per-point robust outcome (True = still correct under attack)."""

    norm: str
    eps: float
    rows_id: str
    robust_correct: Sequence[bool]


@dataclass(frozen=True)
class ChampionDecision:
    """The rule's outcome: `moves` (the candidate becomes champion), `stays`, or `refused` (not comparable)."""

    decision: Literal["moves", "stays", "refused"]
    reason: str
    p_value: float | None = None
    candidate_only: int | None = None  # test points only the candidate withstands
    champion_only: int | None = None  # test points only the champion withstands


def champion_decision(candidate: EvaluationSummary, champion: EvaluationSummary | None,
                      alpha: float = 0.05) -> ChampionDecision:
    """Whether `candidate` replaces `champion` (DESIGN.md §8): it moves when there is no champion, or when
    both were evaluated under the same threat model on the same test rows and the candidate is robust on
    significantly more of them (exact McNemar, two-sided p < alpha, more points only it withstands).
    Otherwise it stays; different threat models or rows are refused as not comparable."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1 (exclusive), got {alpha}")
    if champion is None:
        return ChampionDecision("moves", "no champion yet")
    if candidate.norm != champion.norm or not math.isclose(candidate.eps, champion.eps, rel_tol=1e-9, abs_tol=1e-12):
        return ChampionDecision("refused", f"not comparable: threat model {candidate.norm} eps {candidate.eps:.6g} "
                                           f"vs the champion's {champion.norm} eps {champion.eps:.6g}")
    if candidate.rows_id != champion.rows_id:
        return ChampionDecision("refused", "not comparable: evaluated on different test rows "
                                           f"({candidate.rows_id[:12]} vs the champion's {champion.rows_id[:12]})")
    test = mcnemar_exact(candidate.robust_correct, champion.robust_correct)
    counts = {"p_value": test.p_value, "candidate_only": test.a_only, "champion_only": test.b_only}
    summary = f"exact McNemar p = {test.p_value:.4g} ({test.a_only} points only the candidate withstands, " \
              f"{test.b_only} only the champion; alpha {alpha:g})"
    if test.p_value < alpha and test.a_only > test.b_only:
        return ChampionDecision("moves", f"significantly more robust: {summary}", **counts)
    if test.p_value < alpha:
        return ChampionDecision("stays", f"significantly less robust: {summary}", **counts)
    return ChampionDecision("stays", f"not significantly different: {summary}", **counts)
