"""The ASGI application of `dmat serve` (Starlette): the simple API, the Open Inference Protocol, and /metrics.

    GET  /health  /metadata             the simple API: liveness; classes, input contract, threat
    POST /predict                       model, metrics, lineage; predictions for JSON or PNG/JPEG uploads
    GET  /v2  /v2/health/live  /v2/health/ready                Open Inference Protocol: the server
    GET  /v2/models/{name}[/versions/{version}][/ready]        the model's metadata and readiness
    POST /v2/models/{name}[/versions/{version}]/infer          inference, JSON or binary tensors (oip.py)
    GET  /metrics                       Prometheus text format (metrics.py)

Every inference goes through the dynamic batcher (batching.py). Client errors are 4xx JSON
`{"error": ...}` naming the problem; a failure of ours is a 500 without details (logged).
A request body needs a Content-Length (411 without one, chunked included), which is judged against
--max-body-bytes before a byte is read (413); the whole body must arrive within BODY_DEADLINE_S
(408), and one shorter than declared is a 400. Bodies held in memory at once are bounded in total
(BODY_MEMORY_FACTOR × --max-body-bytes): further requests wait for room. When a body is refused
unread, the server discards up to DRAIN_LIMIT_BYTES of it so the connection stays usable; beyond
that, or when its length is unknown, the answer closes the connection. Bodies above
INLINE_DECODE_BYTES are decoded on a worker thread, so that the event loop keeps answering others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from dmat.deploy import oip
from dmat.deploy.batching import DynamicBatcher
from dmat.deploy.metrics import ServerMetrics
from dmat.deploy.payload import (
    JSON_TYPE,
    MULTIPART_TYPE,
    RequestError,
    decode_json,
    decode_multipart,
    parse_content_type,
)

logger = logging.getLogger("dmat.serve")

BODY_DEADLINE_S = 60.0  # for the whole body, so a client trickling bytes cannot hold its memory for ever
BODY_MEMORY_FACTOR = 4
DRAIN_LIMIT_BYTES = 1024 * 1024
INLINE_DECODE_BYTES = 256 * 1024
SIMPLE_ENDPOINTS = "GET /health, GET /metadata, POST /predict"
Handler = Callable[[Request], Awaitable[Response]]


def create_app(model: Any, batcher: DynamicBatcher, metrics: ServerMetrics, *, max_body_bytes: int,
               access_log: bool = True) -> Any:
    """The ASGI application for `model`: every request counted and timed, and logged with `access_log`."""
    endpoints = Endpoints(model, batcher, metrics, max_body_bytes)
    model_paths = ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}")

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, endpoints.answering_errors(handler), methods=[method])

    routes = [
        route("/health", endpoints.health, "GET"),
        route("/metadata", endpoints.metadata, "GET"),
        route("/predict", endpoints.predict, "POST"),
        route("/metrics", endpoints.metrics, "GET"),
        route("/v2", endpoints.server_metadata, "GET"),
        route("/v2/health/live", endpoints.live, "GET"),
        route("/v2/health/ready", endpoints.ready, "GET"),
        *(route(path, endpoints.model_metadata, "GET") for path in model_paths),
        *(route(f"{path}/ready", endpoints.model_ready, "GET") for path in model_paths),
        *(route(f"{path}/infer", endpoints.infer, "POST") for path in model_paths),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: endpoints.routing_error})
    app.router.redirect_slashes = False  # /health/ is not /health: a 404, not a redirect
    return Instrumented(app, metrics, access_log)


class Endpoints:
    """The request handlers; wrapped in `answering_errors`, a RequestError becomes its 4xx answer."""

    def __init__(self, model: Any, batcher: DynamicBatcher, metrics: ServerMetrics, max_body_bytes: int) -> None:
        self.model = model
        self.batcher = batcher
        self.server_metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_memory = ByteBudget(BODY_MEMORY_FACTOR * max_body_bytes)

    async def health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def metadata(self, request: Request) -> Response:
        return json_response(200, self.model.metadata)

    async def predict(self, request: Request) -> Response:
        length = self._declared_length(request)
        media_type, params = parse_content_type(request.headers.get("content-type"))
        if media_type not in (JSON_TYPE, MULTIPART_TYPE):
            raise RequestError(415, f"Content-Type {media_type or '(none)'} is not accepted: send {JSON_TYPE} "
                                    f'{{"inputs": [...]}} or {MULTIPART_TYPE} with files in the field "image"')
        async with self._body(request, length) as body:
            if media_type == JSON_TYPE:
                batch = await _decode(decode_json, body, self.model.spec)
            else:
                batch = await _decode(decode_multipart, body, params.get("boundary"), self.model.spec)
        logits = await self.batcher.run(batch)
        return json_response(200, {"predictions": self.model.predictions(logits)})

    async def metrics(self, request: Request) -> Response:
        body, media_type = self.server_metrics.exposition()
        return Response(body, 200, media_type=media_type)

    async def server_metadata(self, request: Request) -> Response:
        return json_response(200, oip.server_metadata())

    async def live(self, request: Request) -> Response:
        return json_response(200, {"live": True})

    async def ready(self, request: Request) -> Response:
        return json_response(200, {"ready": True})  # the model is loaded before the server listens

    async def model_metadata(self, request: Request) -> Response:
        self._check_model(request)
        return json_response(200, oip.model_metadata(self.model))

    async def model_ready(self, request: Request) -> Response:
        self._check_model(request)
        return json_response(200, {"name": self.model.name, "ready": True})

    async def infer(self, request: Request) -> Response:
        self._check_model(request)
        length = self._declared_length(request)
        async with self._body(request, length) as body:
            decoded = await _decode(oip.decode_infer, body, request.headers.get(oip.HEADER_LENGTH), self.model)
        logits = await self.batcher.run(decoded.batch)
        content, headers, media_type = oip.encode_infer(decoded, logits, self.model)
        return Response(content, 200, headers, media_type=media_type)

    async def routing_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's 404 (no such path) and 405 (path without that method), as JSON naming the alternatives."""
        path, headers = _printable(request.url.path), dict(exc.headers or {})
        if exc.status_code == 404:
            message = (f"no endpoint {path}; the endpoints are {SIMPLE_ENDPOINTS}, GET /metrics and the Open "
                       f"Inference Protocol under /v2 (model {self.model.name})")
        elif exc.status_code == 405:
            allowed = sorted(headers.get("Allow", "").split(", "))  # Starlette lists a set, in no fixed order
            headers["Allow"] = ", ".join(allowed)
            message = f"{_printable(request.method)} is not allowed on {path}; use {' or '.join(allowed)}"
        else:
            message = exc.detail
        return self._error(request, exc.status_code, message, headers)

    def answering_errors(self, handler: Handler) -> Handler:
        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestError as err:
                return self._error(request, err.status, str(err))
            except Exception:
                logger.exception("%s %s failed", request.method, _printable(request.url.path))
                return self._error(request, 500, "internal server error")

        return answer

    def _error(self, request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        headers = dict(headers or {})
        if self._must_close(request):
            headers["connection"] = "close"
        return json_response(status, {"error": message}, headers)

    def _must_close(self, request: Request) -> bool:
        """Whether the answer must close the connection: a body left unread that is too large to discard, or unknown."""
        if getattr(request.state, "close", False):
            return True
        if getattr(request.state, "body_read", False):
            return False
        if request.headers.get("transfer-encoding"):
            return True
        declared = request.headers.get("content-length")  # llhttp has checked that it is a number
        return declared is not None and int(declared) > DRAIN_LIMIT_BYTES

    def _check_model(self, request: Request) -> None:
        name, version = request.path_params["model_name"], request.path_params.get("model_version")
        if name != self.model.name or version not in (None, self.model.version):
            wanted = f"{name} version {version}" if version is not None else name
            raise RequestError(404, f"unknown model {_printable(wanted)}: this server has {self.model.name} "
                                    f"version {self.model.version}")

    def _declared_length(self, request: Request) -> int:
        """The declared body size, judged before reading: missing is 411, malformed 400, too large 413."""
        if request.headers.get("transfer-encoding"):
            raise RequestError(411, "chunked or encoded bodies are not accepted: send a Content-Length")
        values = request.headers.getlist("content-length")
        if not values:
            raise RequestError(411, "Content-Length is required")
        if len(set(values)) != 1 or not values[0].strip().isdigit():
            raise RequestError(400, f"invalid Content-Length {', '.join(values)!r}")
        length = int(values[0])
        if length > self.max_body_bytes:
            raise RequestError(413, f"body of {length} bytes exceeds the limit of {self.max_body_bytes} bytes "
                                    "(--max-body-bytes)")
        return length

    @contextlib.asynccontextmanager
    async def _body(self, request: Request, length: int) -> AsyncIterator[bytes]:
        """The body, exactly `length` bytes, held in the memory budget until the block ends."""
        async with self.body_memory.holding(length):
            chunks, received = [], 0
            try:
                async with asyncio.timeout(BODY_DEADLINE_S):
                    async for chunk in request.stream():
                        chunks.append(chunk)
                        received += len(chunk)
            except TimeoutError:
                request.state.close = True
                raise RequestError(408, f"request body not received in time ({received} of {length} bytes)") from None
            except ClientDisconnect:
                raise RequestError(400, "the client closed the connection before sending the whole body") from None
            request.state.body_read = True
            if received != length:
                raise RequestError(400, f"body ended after {received} of the {length} bytes of Content-Length")
            yield b"".join(chunks)


class ByteBudget:
    """At most `total` bytes held at once; a holder that does not fit waits until enough is released."""

    def __init__(self, total: int) -> None:
        self._free = total
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def holding(self, size: int) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: size <= self._free)
            self._free -= size
        try:
            yield
        finally:
            async with self._changed:
                self._free += size
                self._changed.notify_all()


class Instrumented:
    """ASGI middleware: per request, the in-flight gauge, the counter and latency by route, and one log line."""

    def __init__(self, app: Any, metrics: ServerMetrics, access_log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before answering

        async def send_noting_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            # The route's template, not the path: clients must not be able to grow the label set.
            self.metrics.observe_request(route.path if route is not None else "unmatched", scope["method"], status,
                                         elapsed)
            if self.access_log:
                logger.info("%s %s %d %.1fms", scope["method"], _printable(scope["path"]), status, elapsed * 1000)


async def _decode(decoder: Callable[..., Any], body: bytes, *args: Any) -> Any:
    if len(body) > INLINE_DECODE_BYTES:
        return await run_in_threadpool(decoder, body, *args)
    return decoder(body, *args)


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")
    return Response(body, status, headers, media_type="application/json; charset=utf-8")


def _printable(text: str, limit: int = 200) -> str:
    """Client-controlled text made safe for a one-line log entry or message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
