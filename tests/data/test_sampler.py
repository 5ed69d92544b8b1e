"""The real/synthetic batch sampler: batch composition, epoch length, determinism, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmat.data.sampler import MixedBatchSampler
from dmat.data.store import write_store


@pytest.mark.parametrize(("fraction", "synthetic"), [(0.0, 0), (0.3, 13), (0.5, 64), (0.7, 13), (1.0, 13)])
def test_batch_composition_and_epoch_length(fraction: float, synthetic: int) -> None:
    n_real, batch = 1000, 64
    sampler = MixedBatchSampler(n_real, np.arange(100, 100 + synthetic), batch_size=batch, fraction=fraction, seed=0)
    batches = list(sampler.epoch(0))
    assert len(batches) == sampler.steps_per_epoch == 16  # ceil(1000 / 64), whatever the generated set's size
    n_syn = round(fraction * batch)
    assert all(len(b.synthetic) == n_syn for b in batches)
    assert all(len(b) == batch for b in batches[:-1])
    real = np.concatenate([b.real for b in batches])
    assert len(real) == len(set(real.tolist()))  # without replacement within an epoch
    if synthetic:
        used = np.concatenate([b.synthetic for b in batches])
        assert set(used.tolist()) <= set(range(100, 100 + synthetic))
        assert len(used) > synthetic or n_syn == 0  # with replacement: more draws than images


def test_deterministic_resume_and_ranks_partition_the_global_batch() -> None:
    sampler = MixedBatchSampler(500, np.arange(50), batch_size=32, fraction=0.5, seed=3)
    full = list(sampler.epoch(2))
    resumed = list(sampler.epoch(2, start_step=5))
    assert all(np.array_equal(a.real, b.real) and np.array_equal(a.synthetic, b.synthetic)
               for a, b in zip(full[5:], resumed, strict=True))
    ranks = [list(sampler.epoch(2, rank=r, world_size=2)) for r in range(2)]
    for step, plan in enumerate(full):
        assert np.array_equal(np.concatenate([ranks[0][step].real, ranks[1][step].real]), plan.real)
        assert np.array_equal(np.concatenate([ranks[0][step].synthetic, ranks[1][step].synthetic]), plan.synthetic)
    assert not np.array_equal(full[0].real, next(sampler.epoch(3)).real)


def test_fraction_needs_generated_images() -> None:
    with pytest.raises(ValueError, match="needs generated images"):
        MixedBatchSampler(10, np.array([], dtype=np.int64), batch_size=8, fraction=0.5, seed=0)


def test_store_read_returns_rows_in_requested_order(tmp_path: Path) -> None:
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    store = write_store(tmp_path / "s", images, np.arange(6) % 2, ("a", "b"), {})
    got, labels = store.read(np.array([4, 1, 4, 0]))
    np.testing.assert_array_equal(got, images[[4, 1, 4, 0]])
    np.testing.assert_array_equal(labels, [0, 1, 0, 0])
    with pytest.raises(IndexError, match="rows must lie in"):
        store.read(np.array([6]))


PEAK_RSS_SCRIPT = """
import resource, sys
import numpy as np
from dmat.data.sampler import MixedBatchSampler
from dmat.data.store import ArrayStore
real, synthetic = ArrayStore.open(sys.argv[1]), ArrayStore.open(sys.argv[2])
sampler = MixedBatchSampler(len(real), np.arange(len(synthetic)), batch_size=256, fraction=0.7, seed=0)
for plan in sampler.epoch(0):
    real.read(plan.real), synthetic.read(plan.synthetic)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _zeros_store(path: Path, n: int) -> Path:
    """A canonical store of n zero images, made as sparse memory-mapped files (cheap even for 1M)."""
    path.mkdir()
    np.lib.format.open_memmap(path / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3)).flush()
    np.lib.format.open_memmap(path / "labels.npy", mode="w+", dtype=np.int64, shape=(n,)).flush()
    meta = {"classes": ["a"], "shape": [n, 32, 32, 3], "class_counts": {"a": n}, "source": {},
            "sha256": {"images": "x", "labels": "y"}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_peak_rss_does_not_grow_with_generated_store(tmp_path: Path) -> None:
    real = _zeros_store(tmp_path / "real", 5_000)
    peaks = {}
    for n in (10_000, 1_000_000):
        synthetic = _zeros_store(tmp_path / f"syn{n}", n)
        out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(real), str(synthetic)], check=True,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        peaks[n] = int(out.stdout.strip()) * 1024
    assert abs(peaks[1_000_000] - peaks[10_000]) < 100 * 2**20, peaks
