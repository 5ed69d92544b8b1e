"""`fetch`: find the real data, downloading it once if needed, and record which data it is -> data/source.json.

With `data.source: auto` (the default) that is the image folder or archive at `data.path` when it exists
(the team's offline CIFAR-10), else torchvision's files in `data.download_dir`, downloaded there once.
The record holds, per split, the source's kind, path and sha256. DVC runs this stage every time
(`always_changed`): the data lives outside the pipeline and may appear, vanish or change, and a
path that may not exist cannot be a DVC dependency. `prepare` depends on the record instead, so it
reruns exactly when the data it would read has changed. No MLflow run: `prepare` logs the source.
"""

from __future__ import annotations

from dmat import pipeline
from dmat.artifacts import layout
from dmat.config import Params
from dmat.data.sources import open_source
from dmat.files import in_project, write_json

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name


def run(params: Params) -> dict:
    cfg = params.data
    splits = open_source(cfg.source, in_project(cfg.path), name=cfg.name, download_dir=in_project(cfg.download_dir),
                         resize=cfg.resize, classes=cfg.classes)
    record = {split: source.description for split, source in splits.items()}
    write_json(layout.SOURCE_RECORD, record)
    train = record["train"]
    print(f"fetch: {cfg.name} from {train['kind']} {train['path']} (sha256 {train['sha256'][:16]}…) -> "
          f"{layout.SOURCE_RECORD}")
    return record
