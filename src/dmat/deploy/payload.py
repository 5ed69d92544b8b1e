"""Request bodies of the simple API -> a float32 N×C×H×W batch in [0, 1], or a RequestError naming what is wrong.

Two encodings reach `POST /predict`: JSON `{"inputs": [...]}` (nested lists of numbers) and
multipart/form-data with PNG or JPEG files in the field `image` (parsed by python-multipart).
Nothing from the client is trusted: shapes, values and image sizes are checked against the model
before anything runs, and an image of the wrong size is refused, not resized. numpy, Pillow, orjson
and python-multipart are imported when a request needs them, so `dmat serve --help` stays light.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
IMAGE_FIELD = "image"


class RequestError(ValueError):
    """A client error: the HTTP status to answer with and a message that names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: one C×H×W image per row, at most `max_batch` rows per request."""

    channels: int
    height: int
    width: int
    max_batch: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def describe(self) -> str:
        return "×".join(map(str, self.shape))


def parse_content_type(header: str | None) -> tuple[str, dict[str, str]]:
    """The lower-cased media type and its parameters (boundary, charset) of a Content-Type header."""
    from python_multipart.multipart import parse_options_header

    if not header:
        return "", {}
    media_type, params = parse_options_header(header)
    return (media_type.decode("latin-1").lower(),
            {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in params.items()})


def decode_json(body: bytes, spec: InputSpec) -> Any:
    """`{"inputs": N×C×H×W nested lists}` -> a validated float32 batch."""
    document = parse_json(body, constant_status=422)
    if not isinstance(document, dict) or "inputs" not in document:
        raise RequestError(422, 'the JSON body must be an object with an "inputs" key holding an N×C×H×W array '
                                f"(C×H×W = {spec.describe()} for this model)")
    return validate_batch(_nested_lists_to_array(document["inputs"], spec), spec)


def parse_json(text: bytes, *, constant_status: int) -> Any:
    """JSON text -> Python values; NaN or Infinity (not JSON) is a `constant_status` error, malformed text a 400.

    orjson parses valid documents several times faster than the standard library (a 3×32×32 image is
    ~60 kB of digits); what it refuses is parsed again by the standard library, whose errors say what is wrong.
    """
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass

    def refuse_constant(name: str) -> None:
        raise RequestError(constant_status, f"inputs contain {name}: every value must be a finite number in [0, 1]")

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    except UnicodeDecodeError:
        raise RequestError(400, "malformed JSON: the body is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise RequestError(400, f"malformed JSON: {err}") from None


def _nested_lists_to_array(inputs: Any, spec: InputSpec) -> Any:
    if not isinstance(inputs, list):
        raise RequestError(422, f'"inputs" must be a list of images (N×{spec.describe()} nested lists), '
                                f"not {type(inputs).__name__}")
    check_batch_size(len(inputs), spec)  # before converting a batch we would refuse anyway
    return json_numbers(inputs, '"inputs"', f"every image must be a {spec.describe()} nested list")


def json_numbers(values: list, what: str, layout: str) -> Any:
    """Nested lists of JSON numbers -> a numpy array; ragged nesting, strings, booleans or nulls are a 422."""
    import numpy as np

    try:
        array = np.array(values)
    except ValueError:
        raise RequestError(422, f"{what} is ragged: {layout}") from None
    # Without a dtype numpy keeps strings and nulls recognisable instead of coercing "0.5" or None, but it
    # still turns true into 1.0 next to numbers: the JSON values' own types settle that.
    if array.dtype.kind not in "iuf" or not _leaf_types(values, array.ndim) <= {int, float}:
        raise RequestError(422, f"{what} must hold numbers only (found strings, booleans, nulls or objects)")
    return array


def _leaf_types(values: list, depth: int) -> set[type]:
    """The types of the values `depth` lists deep, in a nesting numpy found regular."""
    leaves = values
    for _ in range(depth - 1):
        leaves = itertools.chain.from_iterable(leaves)
    return set(map(type, leaves))


def validate_batch(array: Any, spec: InputSpec) -> Any:
    """Check rank, batch size, C×H×W, finiteness and range; return a contiguous float32 array.

    Values are judged in their own precision (float64 from JSON, float32 from binary tensors), so a
    JSON value too large for float32 is reported as it was sent.
    """
    import numpy as np

    if array.ndim != 4:
        raise RequestError(422, f"inputs must be N×C×H×W (rank 4), got rank {array.ndim} "
                                f"with shape {list(array.shape)}")
    check_batch_size(array.shape[0], spec)
    if tuple(array.shape[1:]) != spec.shape:
        got = "×".join(map(str, array.shape[1:]))
        raise RequestError(422, f"each input must be C×H×W = {spec.describe()} for this model, got {got}")
    values = array if array.dtype.kind == "f" else array.astype(np.float64)
    # NaN carries into both extremes and ±inf is one of them: two passes check finiteness and range.
    low, high = float(values.min()), float(values.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise RequestError(422, "inputs contain NaN or infinite values: every value must be a finite number in [0, 1]")
    if low < 0.0 or high > 1.0:
        raise RequestError(422, f"input values must lie in [0, 1]; got min {low:g}, max {high:g}")
    return np.ascontiguousarray(values, dtype=np.float32)


def check_batch_size(count: int, spec: InputSpec) -> None:
    if count == 0:
        raise RequestError(422, "the batch is empty: send at least one input")
    if count > spec.max_batch:
        raise RequestError(413, f"batch of {count} inputs exceeds the limit of {spec.max_batch} (--max-batch)")


def decode_multipart(body: bytes, boundary: str | None, spec: InputSpec) -> Any:
    """multipart/form-data with PNG/JPEG files in the field `image` -> a float32 batch, in upload order."""
    import numpy as np

    uploads = [(filename, data) for name, filename, data in split_multipart(body, boundary) if name == IMAGE_FIELD]
    if not uploads:
        raise RequestError(422, f'the multipart body has no file in the field "{IMAGE_FIELD}"')
    check_batch_size(len(uploads), spec)
    if spec.channels not in (1, 3):
        raise RequestError(422, f"this model takes {spec.channels}-channel input; image uploads can only give "
                                '1 (grey) or 3 (RGB) channels: send JSON "inputs" instead')
    batch = np.empty((len(uploads), *spec.shape), dtype=np.float32)
    for index, (filename, data) in enumerate(uploads):
        batch[index] = decode_image(data, f"upload {index + 1} ({filename or 'unnamed'})", spec)
    return batch


def decode_image(data: bytes, label: str, spec: InputSpec) -> Any:
    """One PNG or JPEG -> C×H×W float32 in [0, 1]; the size is checked before any pixel is decoded."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        # `formats` keeps Pillow to the two decoders we document, whatever else it could parse.
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as image:
            if image.size != (spec.width, spec.height):
                width, height = image.size
                raise RequestError(422, f"{label} is {width}×{height} pixels (width×height); this model takes "
                                        f"{spec.width}×{spec.height} (images are not resized)")
            pixels = np.asarray(image.convert("RGB" if spec.channels == 3 else "L"), dtype=np.float32)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(422, f"{label} is not a PNG or JPEG image") from None
    # Pillow reports broken files with a handful of types (truncated data, bad chunks, bombs): all mean "corrupt".
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise RequestError(422, f"{label} is a corrupt image: {err}") from None
    channels_first = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]
    return channels_first / 255.0


def split_multipart(body: bytes, boundary: str | None) -> list[tuple[str | None, str | None, bytes]]:
    """(field name, filename, content) of every part of a multipart body, in order (RFC 7578)."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser

    if not boundary:
        raise RequestError(400, "multipart/form-data needs a boundary parameter in its Content-Type")
    parts = _PartCollector()
    try:
        parser = MultipartParser(boundary.encode("latin-1"), parts.callbacks())
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, UnicodeEncodeError) as err:
        raise RequestError(400, f"malformed multipart body: {err}") from None
    if not parts.ended:
        raise RequestError(400, "malformed multipart body: it ends without the closing boundary")
    return parts.parts


class _PartCollector:
    """python-multipart's parser calls back with pieces; this gathers them into (name, filename, content) parts."""

    def __init__(self) -> None:
        self.parts: list[tuple[str | None, str | None, bytes]] = []
        self.ended = False
        self._disposition = b""
        self._field, self._value = b"", b""
        self._data: list[bytes] = []

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_part_data": self._part_data, "on_part_end": self._part_end, "on_end": self._end}

    def _begin(self) -> None:
        self._disposition, self._data = b"", []

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            self._disposition = self._value
        self._field, self._value = b"", b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(data[start:end])

    def _part_end(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        name, filename = options.get(b"name"), options.get(b"filename")
        self.parts.append((name.decode("utf-8", "replace") if name is not None else None,
                           filename.decode("utf-8", "replace") if filename is not None else None,
                           b"".join(self._data)))

    def _end(self) -> None:
        self.ended = True
