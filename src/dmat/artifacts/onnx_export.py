"""Exporting a classifier as ONNX under the contract of `dmat.onnx_contract`: used by the `export` stage and by
`dmat import` (an imported checkpoint is exported exactly as a trained one)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dmat.onnx_contract import INPUT_NAME, OUTPUT_NAME

# The exporters want an example batch larger than 1 for a dynamic batch dimension.
EXAMPLE_BATCH = 4


def batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=65536)


def export_classifier_onnx(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    """Dynamo exporter, dynamic batch; input `image` (float32 N×C×H×W in [0, 1]), output `logits`; `metadata` (the
    `dmat.*` entries) becomes the model's metadata_props."""
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: batch_dim()},), verbose=False)
    save_onnx(program.model_proto, path, metadata)


def save_onnx(proto, path: Path, metadata: dict[str, str]) -> None:
    """Write an ONNX model proto with exactly `metadata` as its metadata_props."""
    import onnx

    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))
