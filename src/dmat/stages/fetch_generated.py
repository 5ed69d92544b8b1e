"""`fetch_generated`: record which external generated files `generate` will read -> data/generated_source.json.

With `generate.source: external`, generate converts files that live outside the pipeline (the published EDM
sets are tens of gigabytes, often on another disk). A path named in params cannot be a DVC dependency that
follows the params, so this stage, which DVC runs every time (`always_changed`), writes a record of those files
as the file system sees them: path, size and modification time of each file (of each file inside a folder).
`generate` depends on the record, so DVC reruns it exactly when a source file changes, is replaced or is
named differently; taking the record costs a few `stat` calls, where hashing a 61 GB set on every
`dvc repro` would cost minutes. The content digests (sha256) are computed by `generate` while it reads the
files, and recorded in the store's metadata. With `generate.source: sample` the record says so and nothing
else, so it never triggers a rerun. No MLflow run: `generate` logs the files it read.
"""

from __future__ import annotations

from dmat import pipeline
from dmat.artifacts import layout
from dmat.config import Params
from dmat.data.external import fingerprint
from dmat.files import in_project, write_json

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name


def run(params: Params) -> dict:
    cfg = params.generate
    record = {"source": cfg.source}
    if cfg.source == "external":
        record["files"] = [fingerprint(in_project(path)) for path in cfg.external]
    write_json(layout.GENERATED_SOURCE_RECORD, record)
    print(f"fetch_generated: generate.source {cfg.source}"
          + "".join(f"\n  {f['path']} ({f['size'] / 1e9:.2f} GB)" for f in record.get("files", []))
          + f" -> {layout.GENERATED_SOURCE_RECORD}")
    return record
