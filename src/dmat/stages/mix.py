"""`mix`: decide which generated images the classifier may use, and in what share of each batch.

`mix.source` says which store supplies that "synthetic" share: `generated` (data/synthetic) or
`heldout_real` (data/real/heldout, real images no model of the pipeline trained on: the control that
says what a perfect generator would give). Writes data/mixed/ with `manifest.json` (both stores with
their paths and sha256 digests, the source, the synthetic fraction, how many images of the synthetic
store are used and their class histograms) and `synthetic_indices.npy` (the rows of that store that
are used: a seeded, class-stratified draw, never a prefix, because generated stores are sorted by
class). `train` opens the store the manifest names, and its batch sampler draws round(f·B) of every
batch from those rows.
"""

from __future__ import annotations

import json

import numpy as np

from dmat import pipeline
from dmat.artifacts import layout
from dmat.artifacts.records import MixedStoreRef, MixManifest, RealStoreRef, to_json
from dmat.config import Params
from dmat.data.splits import purpose_rng, stratified_sample
from dmat.data.store import ArrayStore
from dmat.errors import DataError
from dmat.files import atomic_path, sha256_file
from dmat.tracking import stage_run

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name
SECTIONS = DECLARED.sections  # what its MLflow run logs: the params sections it reads


def check_compatible(real: ArrayStore, synthetic: ArrayStore, fraction: float) -> None:
    """Refuse stores that cannot share a batch, naming both."""
    if len(real) == 0 and fraction < 1:
        raise DataError(f"{real.path}: the real training store is empty")
    if fraction > 0 and len(synthetic) == 0:
        raise DataError(f"{synthetic.path}: the store is empty, but mix.synthetic_fraction = {fraction}"
                        + (" (data.heldout_size = 0 leaves data/real/heldout empty)"
                           if synthetic.path == layout.REAL_HELDOUT else ""))
    if real.image_shape != synthetic.image_shape:
        raise DataError(f"{synthetic.path}: generated images are {synthetic.image_shape}, real ones in {real.path} "
                        f"are {real.image_shape}: they cannot share a batch")
    if real.classes != synthetic.classes:
        raise DataError(f"{synthetic.path}: classes {list(synthetic.classes)} differ from {real.path}'s "
                        f"{list(real.classes)}")


def choose_synthetic(synthetic: ArrayStore, params: Params) -> np.ndarray:
    cfg = params.mix
    if cfg.synthetic_fraction == 0:
        return np.empty(0, dtype=np.int64)
    if cfg.synthetic_limit is None:
        return np.arange(len(synthetic), dtype=np.int64)
    if cfg.synthetic_limit > len(synthetic):
        raise DataError(f"mix.synthetic_limit = {cfg.synthetic_limit} is more than the {len(synthetic)} images in "
                        f"{synthetic.path}")
    return stratified_sample(np.asarray(synthetic.labels), cfg.synthetic_limit,
                             purpose_rng(params.base.seed, "mix.synthetic_limit"))


def histogram(labels: np.ndarray, classes: tuple[str, ...]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classes))
    return {name: int(n) for name, n in zip(classes, counts, strict=True)}


def run(params: Params) -> dict:
    cfg = params.mix
    with stage_run(STAGE, params, SECTIONS) as tracked:
        real, synthetic = ArrayStore.open(layout.REAL_TRAIN), ArrayStore.open(layout.MIX_SOURCES[cfg.source])
        check_compatible(real, synthetic, cfg.synthetic_fraction)
        rows = choose_synthetic(synthetic, params)
        with atomic_path(layout.MIXED_DIR, directory=True) as staging:
            np.save(staging / layout.MIX_INDICES_FILE, rows)
            manifest = MixManifest(
                real=RealStoreRef(str(layout.REAL_TRAIN), real.digest, len(real),
                                  histogram(np.asarray(real.labels), real.classes)),
                source=cfg.source,
                synthetic=MixedStoreRef(str(synthetic.path), synthetic.digest, len(synthetic), len(rows),
                                        histogram(np.asarray(synthetic.labels[rows]), real.classes)),
                synthetic_fraction=cfg.synthetic_fraction, synthetic_limit=cfg.synthetic_limit, seed=params.base.seed,
                classes=real.classes, indices_file=layout.MIX_INDICES_FILE,
                indices_sha256=sha256_file(staging / layout.MIX_INDICES_FILE))
            (staging / layout.MIX_MANIFEST_FILE).write_text(json.dumps(to_json(manifest), indent=2, sort_keys=True)
                                                            + "\n")
        tracked.log_store(real, "real/train", context="training")
        tracked.log_store(synthetic, "synthetic", context="training")
        tracked.set_tags({"dmat.mix_source": cfg.source})
        tracked.log_metrics({"synthetic_used": len(rows), "synthetic_fraction": cfg.synthetic_fraction})
        tracked.log_artifact(layout.MIXED_DIR / layout.MIX_MANIFEST_FILE)
    return manifest

