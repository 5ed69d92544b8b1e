"""generate's filter keeps exactly the top share per class: brute force over random confidences, ties included."""

from __future__ import annotations

import numpy as np
import pytest

from dmat.stages.generate import top_per_class


@pytest.mark.parametrize("seed", range(20))
def test_top_per_class_is_exactly_the_most_confident_share(seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes, each = int(rng.integers(1, 6)), int(rng.integers(1, 12))
    labels = np.repeat(np.arange(classes), each)  # sorted by class, as the candidate store
    confidence = rng.choice([0.1, 0.5, 0.9], size=len(labels)) if seed % 2 else rng.random(len(labels))  # ties
    keep = int(rng.integers(0, each + 1))
    rows = top_per_class(confidence, labels, keep)
    assert np.array_equal(rows, np.sort(rows)) and len(rows) == classes * keep
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        kept = [r for r in members if r in set(rows)]
        # brute force: sort every candidate of the class by (−confidence, row) and take the first `keep`
        expected = sorted(members, key=lambda r: (-confidence[r], r))[:keep]
        assert sorted(kept) == sorted(expected)
