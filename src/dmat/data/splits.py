"""Seeded, class-stratified subsets: never a prefix (class-sorted sources would lose whole classes)."""

from __future__ import annotations

import numpy as np


def stratified_counts(class_sizes: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over classes in proportion to their sizes (largest remainder, ties to lower class)."""
    if total > class_sizes.sum():
        raise ValueError(f"cannot take {total} items from {int(class_sizes.sum())}")
    exact = class_sizes * (total / class_sizes.sum())
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    order = np.lexsort((np.arange(len(remainder)), -remainder))  # largest remainder first
    counts[order[: total - counts.sum()]] += 1
    return np.minimum(counts, class_sizes)


def stratified_sample(labels: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending) of a seeded random subset of `total` items with class proportions kept."""
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = stratified_counts(np.bincount(inverse), total)
    chosen = [rng.choice(np.flatnonzero(inverse == c), size=n, replace=False) for c, n in enumerate(counts)]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def purpose_rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent random stream per purpose, so changing one subset never reshuffles another."""
    return np.random.default_rng(np.random.SeedSequence([seed, *purpose.encode()]))


def stratified_sample_preferring(labels: np.ndarray, total: int, avoid: np.ndarray,
                                 rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A seeded draw of `total` items with the class counts of `stratified_sample`, taking items outside the
    boolean mask `avoid` first: a class draws from its avoided items only what its other items cannot supply.

    Returns the indices (ascending) and how many of them are avoided items (0 when every class had enough).
    """
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = stratified_counts(np.bincount(inverse), total) if len(classes) else np.empty(0, dtype=np.int64)
    chosen, reused = [], 0
    for c, n in enumerate(counts):
        free, avoided = (np.flatnonzero((inverse == c) & (avoid == flag)) for flag in (False, True))
        take_free = min(n, len(free))
        chosen += [rng.choice(free, size=take_free, replace=False),
                   rng.choice(avoided, size=n - take_free, replace=False)]
        reused += int(n - take_free)
    return (np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)), reused
