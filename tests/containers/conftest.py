"""Session fixtures of the container tests: a working podman, the base images, the serve and tracking images,
and a batch of the tiny pipeline's test images with the host's onnxruntime logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dmat.data.store import ArrayStore
from dmat.onnx_contract import INPUT_NAME, OUTPUT_NAME
from tests.containers import engine
from tests.deploy.helpers import as_inputs

EXPORTED_MODEL = "models/export/classifier.onnx"
BATCH = 5


@pytest.fixture(scope="session")
def base_images() -> dict[str, str]:
    """{"PYTHON_IMAGE": ..., "POSTGRES_IMAGE": ...}: the images the Dockerfile and the compose file start from."""
    engine.check_engine()
    return engine.base_images()


@pytest.fixture(scope="session")
def serve_image(base_images: dict[str, str]) -> str:
    return engine.build("serve", engine.compose_image("serve"), base_images["PYTHON_IMAGE"])


@pytest.fixture(scope="session")
def tracking_image(base_images: dict[str, str]) -> str:
    return engine.build("tracking", engine.compose_image("mlflow"), base_images["PYTHON_IMAGE"])


@dataclass(frozen=True)
class Batch:
    """A few test images of the tiny pipeline and what onnxruntime on the host makes of them."""

    images: np.ndarray  # uint8 N×H×W×C, as uploaded
    inputs: np.ndarray  # float32 N×C×H×W in [0, 1], as posted in JSON
    logits: np.ndarray  # the host's onnxruntime output for `inputs`
    classes: tuple[str, ...]


@pytest.fixture(scope="session")
def host_batch(tiny_pipeline: Path) -> Batch:
    import onnxruntime

    test = ArrayStore.open(tiny_pipeline / "data/real/test")
    images, _ = test.read(np.arange(BATCH))
    inputs = as_inputs(images)
    session = onnxruntime.InferenceSession(str(tiny_pipeline / EXPORTED_MODEL), providers=["CPUExecutionProvider"])
    return Batch(images, inputs, session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0], test.classes)
