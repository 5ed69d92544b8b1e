"""`prepare` on the full offline CIFAR-10 archive, against a bare read-and-decode loop (the baseline).

Both read the same archive once, forwards, and decode every JPEG with Pillow; the stage also
splits, shuffles, writes the memory-mapped stores and hashes them. The ratio is the stage's cost
over the unavoidable decoding work, measured in one run.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dmat.config import parse_params
from dmat.stages import prepare

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def bare_decode(archive: Path) -> int:
    count = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                count += 1
    return count


def run() -> dict:
    if not ARCHIVE.is_file():
        return {"skipped": f"{ARCHIVE} not found"}
    started = time.perf_counter()
    decoded = bare_decode(ARCHIVE)
    baseline_s = time.perf_counter() - started
    params = parse_params({"data": {"path": str(ARCHIVE)}})
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        try:
            started = time.perf_counter()
            metrics = prepare.run(params)
            stage_s = time.perf_counter() - started
        finally:
            os.chdir(cwd)
    written = sum(m["images"] for m in metrics.values())
    return {
        "images": written,
        "baseline_decode_s": round(baseline_s, 2),
        "baseline_images_per_s": round(decoded / baseline_s),
        "prepare_s": round(stage_s, 2),
        "prepare_images_per_s": round(written / stage_s),
        "prepare_over_baseline": round(stage_s / baseline_s, 2),
    }
