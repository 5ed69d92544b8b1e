"""Checks of an exported ONNX classifier that need nothing but the file and its PyTorch model: the `verify` stage's
first gates, also run by `dmat import --onnx`. Each returns a JSON-able record with `passed`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dmat.artifacts.onnx_classifier import OnnxClassifier
from dmat.onnx_contract import INPUT_NAME, OUTPUT_NAME


def onnx_checker_gate(paths: list[Path]) -> dict:
    import onnx

    errors = {}
    for path in paths:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            errors[path.name] = str(err).splitlines()[0]
    return {"passed": not errors, "errors": errors}


def max_loadable(kind: str) -> int:
    """The highest default-domain opset (or IR version) the installed onnxruntime loads a model with."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    def loads(opset: int, ir: int) -> bool:
        node = helper.make_node("Identity", ["x"], ["y"])
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
        try:
            onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return True
        except Exception:  # onnxruntime's own error types: not loadable
            return False

    if kind == "opset":
        return max((v for v in range(7, onnx.defs.onnx_opset_version() + 1) if loads(v, 8)), default=0)
    return max((v for v in range(3, onnx.IR_VERSION + 1) if loads(13, v)), default=0)


def runtime_versions_gate(paths: list[Path]) -> dict:
    import onnx

    limit_opset, limit_ir = max_loadable("opset"), max_loadable("ir")
    models = {}
    for path in paths:
        proto = onnx.load(str(path), load_external_data=False)
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        models[path.name] = {"opset": opset, "ir_version": proto.ir_version}
    passed = all(m["opset"] <= limit_opset and m["ir_version"] <= limit_ir for m in models.values())
    return {"passed": passed, "models": models, "runtime_max_opset": limit_opset, "runtime_max_ir_version": limit_ir}


def contract_gate(session, shape: list[int], num_classes: int) -> dict:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    found = {"inputs": [(i.name, i.type, i.shape) for i in inputs],
             "outputs": [(o.name, o.type, o.shape) for o in outputs]}
    ok_input = (len(inputs) == 1 and inputs[0].name == INPUT_NAME and inputs[0].type == "tensor(float)"
                and isinstance(inputs[0].shape[0], str) and list(inputs[0].shape[1:]) == shape)
    ok_output = (len(outputs) == 1 and outputs[0].name == OUTPUT_NAME and outputs[0].type == "tensor(float)"
                 and isinstance(outputs[0].shape[0], str) and outputs[0].shape[1] == num_classes)
    return {"passed": ok_input and ok_output, "found": json.loads(json.dumps(found, default=str))}


def parity_gate(onnx_model: OnnxClassifier, model: torch.nn.Module, x: torch.Tensor, batches: tuple[int, ...],
                atol: float) -> dict:
    per_batch = {}
    for size in batches:
        xb = x[:size].numpy()
        ours = onnx_model.run(xb)
        with torch.no_grad():
            reference = model(x[:size]).numpy()
        per_batch[str(size)] = {"max_abs_diff": float(np.abs(ours - reference).max()),
                                "same_predictions": bool((ours.argmax(1) == reference.argmax(1)).all())}
    passed = all(b["max_abs_diff"] <= atol and b["same_predictions"] for b in per_batch.values())
    return {"passed": passed, "atol": atol, "batches": per_batch}
