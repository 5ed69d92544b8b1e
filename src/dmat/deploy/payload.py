"""Request bodies -> a float32 N×C×H×W batch in [0, 1], or a RequestError naming what is wrong.

Two encodings reach `POST /predict`: JSON `{"inputs": [...]}` (nested lists of numbers) and
multipart/form-data with PNG or JPEG files in the field `image`. Nothing from the client is trusted:
shapes, values and image sizes are checked against the model before anything runs, and an image of
the wrong size is refused, not resized. numpy and Pillow are imported when a request needs them, so
`dmat serve --help` stays light.
"""

from __future__ import annotations

import email.message
import email.parser
import email.utils
import io
import json
from dataclasses import dataclass
from typing import Any

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
IMAGE_FIELD = "image"
MAX_BOUNDARY_LENGTH = 70  # RFC 2046 §5.1.1


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
    if not header:
        return "", {}
    message = email.message.Message()
    message["content-type"] = header
    params = {key.lower(): email.utils.collapse_rfc2231_value(value)
              for key, value in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def decode_json(body: bytes, spec: InputSpec) -> Any:
    """`{"inputs": N×C×H×W nested lists}` -> a validated float32 batch."""
    try:
        document = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    except UnicodeDecodeError:
        raise RequestError(400, "malformed JSON: the body is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise RequestError(400, f"malformed JSON: {err}") from None
    if not isinstance(document, dict) or "inputs" not in document:
        raise RequestError(422, 'the JSON body must be an object with an "inputs" key holding an N×C×H×W array '
                                f"(C×H×W = {spec.describe()} for this model)")
    return validate_batch(_nested_lists_to_array(document["inputs"], spec), spec)


def _refuse_constant(name: str) -> None:
    raise RequestError(422, f"inputs contain {name}: every value must be a finite number in [0, 1]")


def _nested_lists_to_array(inputs: Any, spec: InputSpec) -> Any:
    import numpy as np

    if not isinstance(inputs, list):
        raise RequestError(422, f'"inputs" must be a list of images (N×{spec.describe()} nested lists), '
                                f"not {type(inputs).__name__}")
    _check_batch_size(len(inputs), spec)  # before converting a batch we would refuse anyway
    try:
        array = np.array(inputs)
    except ValueError:
        raise RequestError(422, f'"inputs" is ragged: every image must be a {spec.describe()} nested list') from None
    # Without a dtype numpy keeps strings and nulls recognisable instead of coercing "0.5" or None, but it
    # still turns true into 1.0 next to numbers: the JSON values' own types settle that.
    if array.dtype.kind not in "iuf" or not set(map(type, np.array(inputs, dtype=object).flat)) <= {int, float}:
        raise RequestError(422, '"inputs" must hold numbers only (found strings, booleans, nulls or objects)')
    return array


def validate_batch(array: Any, spec: InputSpec) -> Any:
    """Check rank, batch size, C×H×W, finiteness and range; return a contiguous float32 copy."""
    import numpy as np

    if array.ndim != 4:
        raise RequestError(422, f"inputs must be N×C×H×W (rank 4), got rank {array.ndim} "
                                f"with shape {list(array.shape)}")
    _check_batch_size(array.shape[0], spec)
    if tuple(array.shape[1:]) != spec.shape:
        got = "×".join(map(str, array.shape[1:]))
        raise RequestError(422, f"each input must be C×H×W = {spec.describe()} for this model, got {got}")
    values = array.astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        raise RequestError(422, "inputs contain NaN or infinite values: every value must be a finite number in [0, 1]")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise RequestError(422, f"input values must lie in [0, 1]; got min {low:g}, max {high:g}")
    return np.ascontiguousarray(values, dtype=np.float32)


def _check_batch_size(count: int, spec: InputSpec) -> None:
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
    _check_batch_size(len(uploads), spec)
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
    """(field name, filename, content) of every part of a multipart body (RFC 2046 §5.1.1, RFC 7578)."""
    if not boundary or len(boundary) > MAX_BOUNDARY_LENGTH or not boundary.isascii():
        raise RequestError(400, "multipart/form-data needs a boundary parameter of 1 to 70 ASCII characters")
    delimiter = b"\r\n--" + boundary.encode("ascii")
    # A delimiter starts a line; prefixing CRLF lets one split also find a delimiter at the very start.
    sections = (b"\r\n" + body).split(delimiter)
    if len(sections) < 2:
        raise RequestError(400, "malformed multipart body: its boundary never occurs")
    parts = []
    for number, section in enumerate(sections[1:], start=1):
        if section.startswith(b"--"):
            return parts  # the closing delimiter; anything after it is epilogue
        parts.append(_parse_part(section, number))
    raise RequestError(400, "malformed multipart body: it ends without the closing boundary")


def _parse_part(section: bytes, number: int) -> tuple[str | None, str | None, bytes]:
    line_end = section.find(b"\r\n")
    header_end = section.find(b"\r\n\r\n", max(line_end, 0))
    # After the delimiter only transport padding (spaces, tabs) may precede the CRLF that starts the headers.
    if line_end < 0 or header_end < 0 or section[:line_end].strip(b" \t"):
        raise RequestError(400, f"malformed multipart body: part {number} has no header block")
    headers = email.parser.BytesHeaderParser().parsebytes(section[line_end + 2:header_end + 2])
    name = headers.get_param("name", header="content-disposition")
    filename = headers.get_filename()
    return (email.utils.collapse_rfc2231_value(name) if name is not None else None, filename,
            section[header_end + 4:])
