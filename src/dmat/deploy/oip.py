"""The Open Inference Protocol (KServe v2 REST, also spoken by Triton, Seldon MLServer and TorchServe), for DMAT.

`dmat serve` answers the protocol's health, metadata and infer endpoints for its one model. This
module holds the documents and the infer codec; app.py routes them. What a DMAT classifier means
in protocol terms:
- one input, the model's input name (`image`), datatype FP32, shape [N, C, H, W], values in [0, 1];
- outputs `logits` (FP32 [N, num_classes], the model's own output) and `probabilities` (FP32, the
  softmax computed by the server in float64), each returned only when asked for by name; a request
  naming no outputs gets `logits`;
- the class names travel as the model metadata parameter `classes` (index k names logit k).

Tensors come as JSON (`data`, flat or nested in row-major order) or with the binary tensor data
extension: the body is the JSON header, whose length is the `Inference-Header-Content-Length`
header, followed by the raw little-endian tensors in input order, each sized by its
`parameters.binary_data_size`. Outputs come back binary when the request sets
`parameters.binary_data` on the output or `binary_data_output` on the request.
Errors are RequestError with the protocol's statuses: 400 for a bad request (413 for one over the
size limits), rendered as `{"error": "..."}` by the app.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from dmat import __version__
from dmat.deploy.model import probabilities
from dmat.deploy.payload import RequestError, check_batch_size, json_numbers, parse_json, validate_batch
from dmat.onnx_contract import OUTPUT_NAME

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]
FP32 = "FP32"
PROBABILITIES = "probabilities"
OUTPUTS = (OUTPUT_NAME, PROBABILITIES)
BINARY_MEDIA_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: its id (echoed back), the validated float32 batch, and (output name, binary) pairs."""

    id: str | None
    batch: Any
    outputs: list[tuple[str, bool]]


def server_metadata() -> dict[str, Any]:
    return {"name": "dmat-serve", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(model: Any) -> dict[str, Any]:
    """Name, versions, platform and tensor metadata; -1 marks the dynamic batch dimension."""
    classes = len(model.classes)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": model.input_name, "datatype": FP32, "shape": [-1, *model.spec.shape]}],
        "outputs": [{"name": name, "datatype": FP32, "shape": [-1, classes]} for name in OUTPUTS],
        "parameters": {"classes": model.classes, "input_range": [0, 1], "layout": "NCHW",
                       "max_batch": model.spec.max_batch},
    }


def decode_infer(body: bytes, header_length: str | None, model: Any) -> InferRequest:
    """An infer request body (JSON, or JSON header + binary tensors) -> InferRequest, or a RequestError."""
    json_end = _json_header_end(header_length, len(body))
    document = _parse_json(body[:json_end])
    tensor = _the_input(document.get("inputs"), model)
    shape = _shape(tensor.get("shape"), model)
    parameters = _parameters(tensor.get("parameters"), f"input {model.input_name}")
    if "binary_data_size" in parameters:
        array = _binary_tensor(tensor, parameters["binary_data_size"], shape, body[json_end:])
    elif json_end != len(body):
        raise RequestError(400, f"{len(body) - json_end} bytes follow the JSON header, but input "
                                f"{model.input_name} has no parameters.binary_data_size")
    else:
        array = _json_tensor(tensor.get("data"), shape, model.input_name)
    try:
        batch = validate_batch(array, model.spec)
    except RequestError as err:  # the simple API's 422 is the protocol's 400
        raise RequestError(400 if err.status == 422 else err.status, str(err)) from None
    request_id = document.get("id")
    return InferRequest(request_id if isinstance(request_id, str) else None, batch, _requested_outputs(document))


def encode_infer(request: InferRequest, logits: Any, model: Any) -> tuple[bytes, dict[str, str], str]:
    """(body, extra headers, media type) of the answer: JSON, or JSON header + binary outputs."""
    import numpy as np

    response: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": []}
    if request.id is not None:
        response["id"] = request.id
    binaries = []
    for name, binary in request.outputs:
        values = logits if name == OUTPUT_NAME else probabilities(logits).astype(np.float32)
        entry: dict[str, Any] = {"name": name, "datatype": FP32, "shape": list(values.shape)}
        if binary:
            raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binaries.append(raw)
        else:
            entry["data"] = values.ravel().tolist()
        response["outputs"].append(entry)
    header = json.dumps(response, allow_nan=False).encode("utf-8")
    if not binaries:
        return header, {}, "application/json"
    return header + b"".join(binaries), {HEADER_LENGTH: str(len(header))}, BINARY_MEDIA_TYPE


def _json_header_end(header_length: str | None, body_length: int) -> int:
    if header_length is None:
        return body_length
    if not header_length.strip().isdigit() or int(header_length) > body_length:
        raise RequestError(400, f"Inference-Header-Content-Length {header_length!r} is not a byte count within "
                                f"the {body_length}-byte body")
    return int(header_length)


def _parse_json(text: bytes) -> dict[str, Any]:
    document = parse_json(text, constant_status=400)
    if not isinstance(document, dict):
        raise RequestError(400, 'the inference request must be a JSON object with "inputs"')
    return document


def _the_input(inputs: Any, model: Any) -> dict[str, Any]:
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f'"inputs" must be a list holding one tensor, {model.input_name} (FP32 '
                                f"[N, {', '.join(map(str, model.spec.shape))}])")
    tensor = inputs[0]
    if tensor.get("name") != model.input_name:
        raise RequestError(400, f"unknown input {tensor.get('name')!r}: this model's input is {model.input_name}")
    if tensor.get("datatype") != FP32:
        raise RequestError(400, f"input {model.input_name} has datatype {tensor.get('datatype')!r}; this model "
                                f"takes {FP32}")
    return tensor


def _shape(shape: Any, model: Any) -> list[int]:
    """The declared [N, C, H, W], checked before any data is converted; N is judged against --max-batch."""
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise RequestError(400, f"input shape must be [N, {', '.join(map(str, model.spec.shape))}] (rank 4, "
                                f"non-negative integers), got {shape!r}")
    if tuple(shape[1:]) != model.spec.shape:
        raise RequestError(400, f"input shape {shape} does not fit this model: C×H×W must be "
                                f"{model.spec.describe()}")
    try:
        check_batch_size(shape[0], model.spec)
    except RequestError as err:
        raise RequestError(400 if err.status == 422 else err.status, str(err)) from None
    return shape


def _parameters(parameters: Any, owner: str) -> dict[str, Any]:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestError(400, f"parameters of {owner} must be a JSON object")
    return parameters


def _binary_tensor(tensor: dict[str, Any], size: Any, shape: list[int], data: bytes) -> Any:
    import numpy as np

    expected = math.prod(shape) * 4
    if "data" in tensor:
        raise RequestError(400, 'an input with parameters.binary_data_size must not also carry "data"')
    if not isinstance(size, int) or isinstance(size, bool) or size != expected:
        raise RequestError(400, f"binary_data_size {size!r} does not match shape {shape} of FP32 "
                                f"({expected} bytes)")
    if len(data) != size:
        raise RequestError(400, f"{len(data)} bytes of binary tensor data follow the JSON header; "
                                f"binary_data_size says {size}")
    return np.frombuffer(data, dtype="<f4").reshape(shape)


def _json_tensor(data: Any, shape: list[int], name: str) -> Any:
    if not isinstance(data, list):
        raise RequestError(400, f'input {name} needs "data" (a list of numbers in row-major order) or '
                                "parameters.binary_data_size")
    try:
        array = json_numbers(data, f"data of input {name}", "nested lists must follow the shape")
    except RequestError as err:
        raise RequestError(400, str(err)) from None
    if array.size != math.prod(shape):
        raise RequestError(400, f"input {name} has {array.size} values; shape {shape} needs {math.prod(shape)}")
    return array.reshape(shape)


def _requested_outputs(document: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, binary) per requested output; `logits` when none is named."""
    binary_default = _parameters(document.get("parameters"), "the request").get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise RequestError(400, "parameters.binary_data_output must be true or false")
    requested = document.get("outputs")
    if not requested:
        return [(OUTPUT_NAME, binary_default)]
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise RequestError(400, '"outputs" must be a list of objects with a "name"')
    outputs = []
    for output in requested:
        name = output.get("name")
        if name not in OUTPUTS:
            raise RequestError(400, f"unknown output {name!r}: this model has {' and '.join(OUTPUTS)}")
        parameters = _parameters(output.get("parameters"), f"output {name}")
        if parameters.get("classification"):
            raise RequestError(400, "the classification extension is not supported: request logits or "
                                    "probabilities (class names are in the model metadata parameter classes)")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise RequestError(400, f"parameters.binary_data of output {name} must be true or false")
        outputs.append((name, binary))
    return outputs
