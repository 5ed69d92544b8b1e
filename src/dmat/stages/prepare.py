"""`prepare`: real data → data/real/{train,val,test,heldout} canonical stores.

The validation split (`data.val_size`) is a class-stratified seeded draw from the training data,
taken before any subsetting; `data.train_limit` / `data.test_limit` then take stratified seeded
subsets. The test subset and its order come from `data.test_seed`, never from `base.seed`: every
run of a comparison, whatever its training seed, is scored on the same test points.
`data.heldout_size` images are then drawn (class-stratified, seeded, their own random stream) from
the training images in neither train nor val: the held-out-real control, real images
no model of the pipeline trains on (an empty store when 0). Same params, same bytes: every other random
choice comes from `base.seed`, and the held-out draw never changes the other three stores.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dmat import pipeline
from dmat.artifacts import layout
from dmat.config import Params
from dmat.data.sources import SplitSource, open_source
from dmat.data.splits import purpose_rng, stratified_sample
from dmat.data.store import ArrayStore, create_store
from dmat.errors import DataError
from dmat.files import atomic_path, in_project, write_json
from dmat.tracking import stage_run

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name
SECTIONS = DECLARED.sections  # what its MLflow run logs: the params sections it reads
WRITE_CHUNK = 1024


def select_items(splits: dict[str, SplitSource], params: Params) -> dict[str, np.ndarray]:
    """Source indices for each output store, in the order they will be written."""
    cfg, seed, test_seed = params.data, params.base.seed, params.data.test_seed
    n_train = len(splits["train"].labels)
    if cfg.val_size >= n_train:
        raise DataError(f"data.val_size = {cfg.val_size} leaves no training images: the source has {n_train}")
    labels = splits["train"].labels
    val = stratified_sample(labels, cfg.val_size, purpose_rng(seed, "val"))
    rest = np.setdiff1d(np.arange(n_train), val)
    train = _limit(rest, labels, cfg.train_limit, "data.train_limit", seed)
    chosen = {
        "val": val,
        "train": train,
        "test": _limit(np.arange(len(splits["test"].labels)), splits["test"].labels, cfg.test_limit,
                       "data.test_limit", test_seed),
        "heldout": _heldout(np.setdiff1d(rest, train), labels, cfg.heldout_size, seed),
    }
    if not splits["train"].ordered:  # class-sorted folders: write a seeded shuffle instead
        chosen = {name: purpose_rng(test_seed if name == "test" else seed, f"order/{name}").permutation(idx)
                  for name, idx in chosen.items()}
    return chosen


def _limit(candidates: np.ndarray, labels: np.ndarray, limit: int | None, key: str, seed: int) -> np.ndarray:
    if limit is None:
        return candidates
    if limit > len(candidates):
        raise DataError(f"{key} = {limit} is more than the {len(candidates)} images available")
    return candidates[stratified_sample(labels[candidates], limit, purpose_rng(seed, key))]


def _heldout(unused: np.ndarray, labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A stratified seeded draw of `size` of the training images that neither train nor val took."""
    if size == 0:
        return np.empty(0, dtype=np.int64)
    if size > len(unused):
        raise DataError(f"data.heldout_size = {size} is more than the {len(unused)} training images left outside "
                        "train and val: lower data.heldout_size or data.train_limit")
    return unused[stratified_sample(labels[unused], size, purpose_rng(seed, "data.heldout_size"))]


def write_split(outputs: dict[str, tuple[Path, np.ndarray, dict]], split: SplitSource) -> None:
    """Write several stores from one source split, reading (and decoding) the source once, in its order.

    `outputs` maps a store name to (path, source indices in store order, source description).
    """
    owner = np.full(len(split.labels), -1, dtype=np.int64)  # which output each source item goes to
    position = np.empty(len(split.labels), dtype=np.int64)  # and its row there
    for k, (_, order, _) in enumerate(outputs.values()):
        owner[order], position[order] = k, np.arange(len(order))
    wanted = np.flatnonzero(owner >= 0)
    items = split.read(wanted)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(create_store(path, len(order), split.image_shape, split.classes, source))
                   for path, order, source in outputs.values()]
        progress = stack.enter_context(tqdm(total=len(wanted), desc=f"prepare {'+'.join(outputs)}", unit="img",
                                            mininterval=2))
        while block := list(itertools.islice(items, WRITE_CHUNK)):
            indices = np.array([index for index, _ in block])
            images = np.stack([image for _, image in block])
            for k, writer in enumerate(writers):
                mine = owner[indices] == k
                writer.write(position[indices[mine]], images[mine], split.labels[indices[mine]])
            progress.update(len(block))


def _describe(split: SplitSource, name: str, params: Params) -> dict:
    limits = {"train": params.data.train_limit, "val": None, "test": params.data.test_limit,
              "heldout": params.data.heldout_size}
    seed = params.data.test_seed if name == "test" else params.base.seed
    return {**split.description, "dataset": params.data.name, "output": name, "seed": seed,
            "val_size": params.data.val_size, "limit": limits[name]}


def run(params: Params) -> dict:
    cfg = params.data
    with stage_run(STAGE, params, SECTIONS) as tracked:
        splits = open_source(cfg.source, in_project(cfg.path), name=cfg.name,
                             download_dir=in_project(cfg.download_dir), resize=cfg.resize, classes=cfg.classes)
        chosen = select_items(splits, params)
        source = splits["train"].description
        if "sha256" in source:
            tracked.log_dataset(f"source/{cfg.name}", str(Path(source["path"]).resolve()), source["sha256"],
                                context="source")
        with atomic_path(layout.REAL_DIR, directory=True) as staging:  # all four stores appear together
            for source_split, names in (("train", ("train", "val", "heldout")), ("test", ("test",))):
                split = splits[source_split]
                write_split({name: (staging / name, chosen[name], _describe(split, name, params))
                             for name in names}, split)
        stores = {name: ArrayStore.open(layout.REAL_DIR / name) for name in layout.REAL_SPLITS}
        report = {
            name: {"images": len(store), "sha256": store.digest,
                   "class_counts": dict(zip(store.classes, map(int, store.meta.class_counts), strict=True))}
            for name, store in stores.items()
        }
        write_json(layout.report_file(STAGE), {**report, "source": source})
        write_json(layout.metrics_file(STAGE), {f"{name}_images": len(store) for name, store in stores.items()})
        for name, store in stores.items():
            tracked.log_store(store, name=f"real/{name}", context=f"prepared-{name}")
            counts = zip(store.classes, store.meta.class_counts, strict=True)
            tracked.log_metrics({f"{name}.images": len(store)} | {f"{name}.count.{c}": n for c, n in counts})
            tracked.set_tags({f"dmat.output.{name}.sha256": store.digest})
        tracked.log_artifact(layout.report_file(STAGE))
    return report
