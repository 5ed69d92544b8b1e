"""The ONNX classifier contract: what `export` writes and what verify, lineage and serving read.

One float32 input `image` [N, C, H, W] in [0, 1] with a dynamic batch dimension, one output
`logits` [N, num_classes], and `metadata_props` whose keys start with `dmat.` and whose values are
JSON (classes, input, threat, metrics, lineage). Standard library only: the serving image imports
this module, and it has neither torch nor onnx.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
METADATA_PREFIX = "dmat."

# Denoiser export: D(x; σ, y).
DENOISER_INPUTS = ("noisy", "sigma", "class_labels")
DENOISER_OUTPUT = "denoised"


def encode_metadata(info: Mapping[str, Any]) -> dict[str, str]:
    """{"classes": [...], ...} -> {"dmat.classes": "[...]", ...}: metadata_props are strings, each entry JSON."""
    return {f"{METADATA_PREFIX}{key}": json.dumps(value, sort_keys=True) for key, value in info.items()}


def decode_metadata(props: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The `dmat.*` entries of (key, value) pairs, decoded; other keys are ignored. Raises ValueError on bad JSON."""
    return {key.removeprefix(METADATA_PREFIX): json.loads(value) for key, value in props
            if key.startswith(METADATA_PREFIX)}
