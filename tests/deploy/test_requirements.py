"""The serving image's pins stay those of the training environment."""

from __future__ import annotations

import re

from tests.deploy.helpers import REPO_ROOT


def pins(name: str) -> dict[str, str]:
    """package (normalised) -> its version specifier, from a requirements file."""
    lines = (REPO_ROOT / name).read_text().splitlines()
    entries = (line.split("#")[0].strip() for line in lines)
    matches = (re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", entry) for entry in entries if entry)
    return {re.sub(r"[-_.]+", "-", m[1]).lower(): m[2].replace(" ", "") for m in matches}


def test_serving_requirements_match_the_pipeline_pins() -> None:
    serve, pipeline = pins("requirements-serve.txt"), pins("requirements.txt")
    assert {"onnxruntime", "numpy", "pillow", "mlflow-skinny", "uvicorn", "httptools", "starlette", "python-multipart",
            "prometheus-client"} <= serve.keys()
    assert "torch" not in serve
    assert {name: serve[name] for name in serve.keys() & pipeline.keys()} == \
        {name: pipeline[name] for name in serve.keys() & pipeline.keys()}
    assert serve["mlflow-skinny"] == pipeline["mlflow"]  # the skinny client of the same MLflow release
