"""The classifier behind `dmat serve`: resolving MODEL, loading it into onnxruntime, its metadata, its outputs.

The ONNX contract (dmat.onnx_contract, what the `export` stage writes): one float32 input `image`
[N, C, H, W] in [0, 1] with a dynamic batch dimension, one output `logits` [N, num_classes], and
JSON-encoded `metadata_props` under `dmat.*` (classes, input, threat, metrics, lineage). Missing or
unreadable metadata is not fatal: the input size then comes from the graph and the classes are
named "0".."K-1".

Only the standard library is imported at module level; onnxruntime and numpy are imported when a
model is loaded, mlflow (through dmat.tracking) only for models:/ URIs, and torch never (a serving
image ships onnxruntime only).
"""

from __future__ import annotations

import logging
import mmap
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmat.deploy.payload import InputSpec
from dmat.files import sha256_file
from dmat.onnx_contract import OUTPUT_NAME, decode_metadata

logger = logging.getLogger("dmat.serve")

REPORTED_KEYS = ("threat", "metrics", "lineage")  # in /metadata always, null when the model lacks them
REGISTRY_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
REGISTRY_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
FILE_MODEL_VERSION = "1"  # a .onnx file has no registry version; the protocol's URLs still name one


class ModelError(RuntimeError):
    """The model cannot be resolved or loaded; the message names the model and the reason."""


@dataclass
class ServedModel:
    """One onnxruntime session and what the endpoints report about it. `logits` is safe to call from many threads.

    `name` and `version` address it in the Open Inference Protocol (/v2/models/<name>[/versions/<version>]):
    the registered model's name and version, or the file's stem and "1".
    """

    session: Any
    input_name: str
    output_name: str
    spec: InputSpec
    classes: list[str]
    name: str
    version: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def logits(self, batch: Any) -> Any:
        """float32 [N, num_classes] for a float32 [N, C, H, W] batch, checked against the contract."""
        logits = self.session.run([self.output_name], {self.input_name: batch})[0]
        if logits.shape != (batch.shape[0], len(self.classes)):
            raise RuntimeError(f"model returned {OUTPUT_NAME} of shape {logits.shape} for a batch of "
                               f"{batch.shape[0]}; expected ({batch.shape[0]}, {len(self.classes)})")
        return logits

    def predictions(self, logits: Any) -> list[dict[str, Any]]:
        """Class index and name, softmax probabilities (float64) and logits per row, in order."""
        return [{"class_index": int(index), "class_name": self.classes[index],
                 "probabilities": row_probabilities.tolist(), "logits": row_logits.tolist()}
                for index, row_probabilities, row_logits
                in zip(logits.argmax(axis=1), probabilities(logits), logits.astype("float64"), strict=True)]


def probabilities(logits: Any) -> Any:
    """Softmax over classes, computed in float64 (float32 would round small probabilities to 0 sooner)."""
    import numpy as np

    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def load(spec: str, *, max_batch: int, intra_op_threads: int) -> ServedModel:
    """Resolve MODEL (a .onnx path or a models:/ URI) and load it, checking the input/output contract."""
    if spec.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="dmat-serve-") as download:
            # The session holds the weights once built, so the download can go when this block ends.
            path, registered = download_registered(spec, Path(download))
            return load_file(path, source={"uri": spec, **registered}, name=registered["name"],
                             version=registered["version"], max_batch=max_batch, intra_op_threads=intra_op_threads)
    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"model file {spec} not found (give a .onnx file or models:/<name>@<alias>)")
    # The file name only: /metadata is public, the server's directory layout is not.
    return load_file(path, source={"uri": path.name}, name=path.stem, version=FILE_MODEL_VERSION,
                     max_batch=max_batch, intra_op_threads=intra_op_threads)


def download_registered(uri: str, destination: Path) -> tuple[Path, dict[str, str]]:
    """Download a registered model version's files through dmat.tracking (numpy and yaml, never torch)."""
    from dmat.tracking import TrackingError, download_model_version

    if match := REGISTRY_ALIAS.match(uri):
        where = {"alias": match["alias"]}
    elif match := REGISTRY_VERSION.match(uri):
        where = {"version": match["version"]}
    else:
        raise ModelError(f"{uri} is not models:/<name>@<alias> or models:/<name>/<version>")
    try:
        local, registered = download_model_version(match["name"], destination, **where)
    except TrackingError as err:
        raise ModelError(f"cannot resolve {uri}: {err}") from None
    return find_onnx_file(local, uri), registered


def find_onnx_file(local: Path, uri: str) -> Path:
    if local.is_file():
        return local
    candidates = [local / "model.onnx"] if (local / "model.onnx").is_file() else sorted(local.rglob("*.onnx"))
    if len(candidates) != 1:
        raise ModelError(f"{uri} holds {len(candidates)} .onnx files, expected model.onnx (logged with "
                         "mlflow.onnx.log_model)")
    return candidates[0]


def load_file(path: Path, *, source: dict[str, str], name: str, version: str, max_batch: int,
              intra_op_threads: int) -> ServedModel:
    session = _open_session(path, intra_op_threads)
    input_name, graph_shape = _check_input(session, path)
    output_name = _pick_output(session, path)
    declared = read_metadata(session)
    channels, height, width = _input_shape(graph_shape, declared.get("input"), path)
    spec = InputSpec(channels, height, width, max_batch)
    classes = _class_names(session, input_name, output_name, spec, declared.get("classes"), path)
    header = read_onnx_header(path)
    metadata = {
        # Further dmat.* entries (say, evaluations under other threat models) pass through as they are.
        **{key: value for key, value in declared.items() if key not in ("classes", "input")},
        **{key: declared.get(key) for key in REPORTED_KEYS},
        "classes": classes,
        "input": {"name": input_name, "shape": list(spec.shape), "dtype": "float32", "range": [0, 1],
                  "layout": "NCHW"},
        "output": {"name": output_name, "num_classes": len(classes)},
        "sha256": sha256_file(path),
        "opset": header["opset"],
        "ir_version": header["ir_version"],
        "source": source,
    }
    logger.info("loaded %s: input %s %s, %d classes, sha256 %s", source["uri"], input_name,
                "×".join(map(str, spec.shape)), len(classes), metadata["sha256"][:12])
    return ServedModel(session, input_name, output_name, spec, classes, name, version, metadata)


def _open_session(path: Path, intra_op_threads: int) -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise ModelError(f"serving needs onnxruntime: pip install -r requirements-serve.txt ({err})") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # Several request threads share the cores: idle pool threads spinning for work would steal them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise ModelError(f"onnxruntime cannot load {path}: {err}") from None


def _check_input(session: Any, path: Path) -> tuple[str, list[Any]]:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{path} has {len(inputs)} inputs; a DMAT classifier has one (image)")
    (image,) = inputs
    if image.type != "tensor(float)" or len(image.shape) != 4:
        raise ModelError(f"{path}: input {image.name} is {image.type} of rank {len(image.shape)}; "
                         "expected float32 N×C×H×W")
    return image.name, list(image.shape)


def _pick_output(session: Any, path: Path) -> str:
    names = [output.name for output in session.get_outputs()]
    if OUTPUT_NAME in names:
        return OUTPUT_NAME
    logger.warning("%s has no output named %s; serving its first output %s", path, OUTPUT_NAME, names[0])
    return names[0]


def read_metadata(session: Any) -> dict[str, Any]:
    """The decoded `dmat.*` metadata_props, without the prefix; an unreadable entry is logged and left out."""
    decoded = {}
    for entry in session.get_modelmeta().custom_metadata_map.items():
        try:
            decoded.update(decode_metadata([entry]))
        except ValueError as err:
            logger.warning("ignoring metadata %s: not JSON (%s)", entry[0], err)
    return decoded


def _input_shape(graph_shape: list[Any], declared_input: Any, path: Path) -> tuple[int, int, int]:
    """C, H, W from the graph where it fixes them, else from `dmat.input`; a disagreement is logged."""
    graph_chw = graph_shape[1:]
    declared_chw = declared_input.get("shape") if isinstance(declared_input, dict) else None
    if not _positive_ints(declared_chw, 3):
        declared_chw = None
    if _positive_ints(graph_chw, 3):
        if declared_chw is not None and list(declared_chw) != graph_chw:
            logger.warning("dmat.input says C×H×W %s but the graph takes %s: using the graph's", declared_chw,
                           graph_chw)
        return tuple(graph_chw)
    if declared_chw is not None:
        return tuple(declared_chw)
    raise ModelError(f"{path}: cannot tell the input size: the graph's C×H×W is {graph_chw} and "
                     "metadata dmat.input gives no shape")


def _positive_ints(values: Any, count: int) -> bool:
    return (isinstance(values, list) and len(values) == count
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values))


def _class_names(session: Any, input_name: str, output_name: str, spec: InputSpec, declared: Any,
                 path: Path) -> list[str]:
    """Run one zero image (also warming the session up) to learn K; names from `dmat.classes` when they fit."""
    import numpy as np

    try:
        logits = session.run([output_name], {input_name: np.zeros((1, *spec.shape), dtype=np.float32)})[0]
    except Exception as err:  # onnxruntime's own exception types
        raise ModelError(f"{path} fails on a 1×{spec.describe()} input: {err}") from None
    if logits.ndim != 2 or logits.shape[0] != 1:
        raise ModelError(f"{path}: output {output_name} has shape {list(logits.shape)} for one image; "
                         "expected [1, num_classes]")
    count = logits.shape[1]
    if isinstance(declared, list) and len(declared) == count and all(isinstance(n, str) for n in declared):
        return declared
    if declared is not None:
        logger.warning("ignoring metadata dmat.classes: not a list of %d names", count)
    return [str(index) for index in range(count)]


def read_onnx_header(path: Path) -> dict[str, Any]:
    """ir_version and opset imports, read from the file's top-level protobuf fields without the onnx package.

    ModelProto field 1 is ir_version, field 8 the repeated OperatorSetIdProto (1: domain, 2: version);
    the graph (field 7) is skipped by its length, so this costs nothing for large models.
    """
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            ir_version, opset = None, {}
            for number, value in _protobuf_fields(data, 0, len(data)):
                if number == 1 and isinstance(value, int):
                    ir_version = value
                elif number == 8 and isinstance(value, tuple):
                    entry = dict(_protobuf_fields(data, *value))
                    domain = bytes(data[slice(*entry[1])]).decode() if 1 in entry else ""
                    opset[domain or "ai.onnx"] = entry.get(2, 1)
            return {"ir_version": ir_version, "opset": opset}
    except (OSError, ValueError, IndexError, KeyError, TypeError) as err:
        logger.warning("cannot read the ONNX header of %s: %s", path, err)
        return {"ir_version": None, "opset": None}


def _protobuf_fields(data: Any, start: int, end: int) -> Iterator[tuple[int, int | tuple[int, int] | None]]:
    """(field number, value) pairs: varints as ints, length-delimited fields as (start, end) offsets."""
    position = start
    while position < end:
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = (position, position + length), position + length
        elif wire_type in (1, 5):
            value, position = None, position + (8 if wire_type == 1 else 4)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type} at byte {position}")
        if position > end:
            raise ValueError("protobuf field runs past the end of the file")
        yield number, value


def _varint(data: Any, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ValueError(f"malformed protobuf varint before byte {position}")
