"""Stratified seeded subsets: exact sizes, class proportions kept, never a prefix."""

from __future__ import annotations

import numpy as np
import pytest

from dmat.data.splits import purpose_rng, stratified_counts, stratified_sample, stratified_sample_preferring


def test_counts_sum_exactly_and_stay_proportional() -> None:
    counts = stratified_counts(np.full(10, 5000), 1024)
    assert counts.sum() == 1024 and set(counts) == {102, 103}


def test_sample_is_not_a_prefix_and_keeps_every_class() -> None:
    labels = np.repeat(np.arange(10), 100)  # class-sorted, like an image folder
    chosen = stratified_sample(labels, 50, purpose_rng(0, "x"))
    assert len(chosen) == 50 and len(set(chosen)) == 50
    assert np.all(np.bincount(labels[chosen], minlength=10) == 5)
    assert not np.array_equal(chosen, np.arange(50))


def test_same_seed_same_subset_and_purposes_independent() -> None:
    labels = np.repeat(np.arange(3), 30)
    first = stratified_sample(labels, 9, purpose_rng(7, "val"))
    assert np.array_equal(first, stratified_sample(labels, 9, purpose_rng(7, "val")))
    assert not np.array_equal(first, stratified_sample(labels, 9, purpose_rng(7, "train")))


def test_too_many_is_an_error() -> None:
    with pytest.raises(ValueError):
        stratified_counts(np.array([2, 2]), 5)


@pytest.mark.parametrize("seed", range(5))
def test_preferring_draw_avoids_the_masked_items_whenever_a_class_can(seed: int) -> None:
    """Brute force over random masks: class counts as `stratified_sample`, masked items only where a class runs
    out of others, and the count of masked items taken is exact."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 25)
    avoid = rng.random(100) < rng.uniform(0.2, 0.95)
    total = int(rng.integers(4, 100))
    chosen, reused = stratified_sample_preferring(labels, total, avoid, purpose_rng(seed, "eval"))
    expected_counts = stratified_counts(np.bincount(labels), total)
    assert len(set(chosen)) == len(chosen) == total and np.array_equal(chosen, np.sort(chosen))
    assert np.array_equal(np.bincount(labels[chosen], minlength=4), expected_counts)
    for c in range(4):
        free = int(np.sum((labels == c) & ~avoid))
        taken_avoided = int(np.sum(avoid[chosen] & (labels[chosen] == c)))
        assert taken_avoided == max(0, expected_counts[c] - free)
    assert reused == int(avoid[chosen].sum())


def test_preferring_draw_without_a_mask_is_seeded_and_never_a_prefix() -> None:
    labels = np.repeat(np.arange(3), 30)
    first, reused = stratified_sample_preferring(labels, 9, np.zeros(90, dtype=bool), purpose_rng(1, "x"))
    again, _ = stratified_sample_preferring(labels, 9, np.zeros(90, dtype=bool), purpose_rng(1, "x"))
    assert reused == 0 and np.array_equal(first, again) and not np.array_equal(first, np.arange(9))
