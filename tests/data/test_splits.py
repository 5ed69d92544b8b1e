"""Stratified seeded subsets: exact sizes, class proportions kept, never a prefix."""

from __future__ import annotations

import numpy as np
import pytest

from dmat.data.splits import purpose_rng, stratified_counts, stratified_sample


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
