"""End to end: a generated set in the reference's published layout (two .npz parts outside the project) replaces
sampling under a real `dvc repro`: DVC reruns generate exactly when a part changes, evaluate_diffusion measures the
set next to held-out real images, and `dmat lineage` runs from the classifier back to the downloaded files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from dmat.data.store import ArrayStore
from dmat.files import sha256_file
from tests.conftest import BIN_DIR
from tests.e2e.test_pipeline import run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
DVC = str(BIN_DIR / "dvc")


def published_part(path: Path, classes: int, shape: tuple[int, ...], per_class: int, seed: int) -> Path:
    """A part as the reference publishes them: `image` uint8 N×H×W×C, `label` int64, sorted by class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    np.savez(path, image=rng.integers(0, 256, size=(len(labels), *shape), dtype=np.uint8), label=labels)
    return path


def ran(result) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", result.stdout)


def test_published_parts_feed_the_pipeline_and_lineage_reaches_the_files(tiny_pipeline: Path, tmp_path: Path) -> None:
    from dvc.utils.hydra import apply_overrides

    project = shutil.copytree(tiny_pipeline, tmp_path / "project", symlinks=True)
    real = ArrayStore.open(project / "data/real/train")
    downloads = tmp_path / "edm_data"  # outside the project, as a download would be
    downloads.mkdir()
    parts = [published_part(downloads / f"20m_part{i}.npz", len(real.classes), real.image_shape, 3, seed=i)
             for i in (1, 2)]
    apply_overrides(str(project / "params.yaml"),  # what `-S` does; `++`: the tiny params leave these keys out
                    ["++generate.source=external", f"++generate.external=[{parts[0]},{parts[1]}]"])

    first = run([DVC, "repro", "train", "evaluate_diffusion"], project)
    assert {"fetch_generated", "generate", "mix", "train", "evaluate_diffusion"} <= set(ran(first)), first.stdout
    assert "train_diffusion" not in ran(first)  # the params change touches only what reads the generated set
    store = ArrayStore.open(project / "data/synthetic", verify=True)
    assert len(store) == 2 * 3 * len(real.classes) and store.meta.source["kind"] == "external"
    assert [f["sha256"] for f in store.meta.source["files"]] == [sha256_file(p) for p in parts]
    quality = json.loads((project / "metrics/evaluate_diffusion.json").read_text())
    assert 0 <= quality["conditional_accuracy"] <= 1 and "heldout_conditional_accuracy" in quality

    lineage = json.loads(run([str(BIN_DIR / "dmat"), "lineage", "models/classifier/best.pt", "--json"],
                             project).stdout)
    assert lineage["status"] == "verified", lineage["problems"]
    files = [stage for stage in lineage["stages"] if stage["stage"] == "external"]
    assert sorted((project / stage["path"]).resolve() for stage in files) == sorted(p.resolve() for p in parts)
    assert all(stage["status"] == "verified" for stage in files)

    again = run([DVC, "repro", "generate"], project)
    assert "fetch_generated" in ran(again) and "Stage 'generate' didn't change, skipping" in again.stdout, \
        again.stdout  # the files were looked at (fetch looks at the real data, as always), nothing converted
    published_part(parts[1], len(real.classes), real.image_shape, 3, seed=7)  # a new download at the same path
    changed = run([DVC, "repro", "generate"], project)
    assert {"fetch_generated", "generate"} <= set(ran(changed)), changed.stdout
    assert ArrayStore.open(project / "data/synthetic").meta.source["files"][1]["sha256"] == sha256_file(parts[1])
