"""`dmat serve MODEL`: an ONNX classifier over HTTP (GET /health, GET /metadata, POST /predict).

One onnxruntime session (its `run` is thread-safe) shared by a fixed pool of `--workers` request
threads; further connections wait in the listen backlog, so load never grows the thread count.
Every response closes its connection (HTTP/1.0): an idle keep-alive client cannot hold a worker.
Client errors are 4xx JSON `{"error": ...}` naming the problem; the body size is checked from
Content-Length before a byte of the body is read. Binds 127.0.0.1 unless told otherwise, stops
cleanly (exit 0) on SIGTERM or SIGINT. Only the standard library is imported here: cli.py imports
this module to build its parser, and serving must work where torch is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dmat import __version__
from dmat.deploy.payload import (
    JSON_TYPE,
    MULTIPART_TYPE,
    RequestError,
    decode_json,
    decode_multipart,
    parse_content_type,
)

logger = logging.getLogger("dmat.serve")

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
DEFAULT_WORKERS = 4
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
SOCKET_TIMEOUT_S = 30.0  # per read or write on a connection
BODY_DEADLINE_S = 60.0  # for the whole body, so a client trickling bytes cannot hold a worker for ever
DRAIN_LIMIT_BYTES = 1024 * 1024  # of an unread body, discarded so the client can read our error answer
DRAIN_TIMEOUT_S = 1.0
STOP_POLL_S = 0.2
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Endpoints: GET /health; GET /metadata (classes, input contract, threat model, metrics, lineage, "
                     'sha256, opset); POST /predict with JSON {"inputs": N×C×H×W values in [0, 1]} or multipart '
                     "form-data PNG/JPEG files in the field `image` (of the model's exact size). Client errors are "
                     "4xx JSON {\"error\": ...}. SIGTERM or SIGINT stops the server (exit 0).")
    parser.add_argument("model", metavar="MODEL",
                        help="a .onnx file, or models:/<name>@<alias> or models:/<name>/<version> from the MLflow "
                             "registry (MLFLOW_TRACKING_URI; default sqlite:///<project root>/mlflow.db)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; the server has no "
                             "authentication, so expose it with care)")
    parser.add_argument("--port", type=_port, default=8080, help="TCP port (default 8080; 0 picks a free one, "
                                                                 "printed with the URL)")
    parser.add_argument("--workers", type=_positive_int, default=DEFAULT_WORKERS,
                        help="requests handled at once, each on its own thread sharing one onnxruntime session; "
                             "each inference gets max(1, CPUs // workers) onnxruntime threads; more connections "
                             f"wait in the listen backlog (default {DEFAULT_WORKERS})")
    parser.add_argument("--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH,
                        help=f"most images per /predict request; more is a 413 (default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted, judged from Content-Length before reading it; "
                             f"more is a 413 (default {DEFAULT_MAX_BODY_BYTES})")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _port(text: str) -> int:
    value = _positive_int(text) if text != "0" else 0
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535)")
    return value


def run(args: argparse.Namespace) -> int:
    from dmat.deploy import served_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        model = served_model.load(args.model, max_batch=args.max_batch,
                                  intra_op_threads=max(1, _cpu_count() // args.workers))
    except (served_model.ModelError, OSError) as err:
        return _fail(err, EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    model.metadata["limits"] = {"max_batch": args.max_batch, "max_body_bytes": args.max_body_bytes}
    try:
        server = ModelServer((args.host, args.port), model, workers=args.workers, max_body_bytes=args.max_body_bytes)
    except OSError as err:
        return _fail(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}", EXIT_FAILED)
    return serve_until_signalled(server)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fail(message: object, code: int) -> int:
    print(f"dmat serve: error: {message}", file=sys.stderr)
    return code


def serve_until_signalled(server: ModelServer) -> int:
    """Serve on a background thread until SIGTERM or SIGINT, then finish in-flight requests and exit 0."""
    stop = []  # a handler appending to a list takes no lock, so it cannot deadlock the thread it interrupts
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    accepting = threading.Thread(target=server.serve_forever, name="dmat-serve-accept", daemon=True)
    accepting.start()
    host = server.server_address[0]
    if host not in LOOPBACK_HOSTS:
        logger.warning("listening on %s: reachable from other machines, without authentication", host)
    print(f"dmat serve: listening on {server.url}", flush=True)
    try:
        while not stop:
            time.sleep(STOP_POLL_S)
    finally:
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped (%s)", signal.Signals(stop[0]).name if stop else "exiting")
    return EXIT_OK


class ModelServer(http.server.HTTPServer):
    """Handles at most `workers` requests at once on a fixed thread pool; the rest wait in the listen backlog."""

    request_queue_size = 128

    def __init__(self, address: tuple[str, int], model: Any, *, workers: int, max_body_bytes: int):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.model = model
        self.max_body_bytes = max_body_bytes
        self._free_workers = threading.BoundedSemaphore(workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dmat-serve")
        super().__init__(address, PredictionHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can hang for seconds without DNS; unused here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        self._free_workers.acquire()  # blocks accepting while every worker is busy
        self._pool.submit(self._handle, request, client_address)

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._free_workers.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("connection from %s failed", client_address[0] if client_address else "?")

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=True)


class PredictionHandler(http.server.BaseHTTPRequestHandler):
    """Routes one request, answers JSON, and logs one line: method, path, status, milliseconds."""

    server: ModelServer
    server_version = f"dmat-serve/{__version__}"
    protocol_version = "HTTP/1.0"
    timeout = SOCKET_TIMEOUT_S

    def version_string(self) -> str:
        return self.server_version  # without http.server's Python version

    def handle_one_request(self) -> None:
        self._started = time.perf_counter()
        self._status: int | None = None
        self._unread_body = 0
        super().handle_one_request()
        if self._status is not None:
            elapsed_ms = (time.perf_counter() - self._started) * 1000
            logger.info("%s %s %d %.1fms", _printable(getattr(self, "command", None) or "-"),
                        _printable(getattr(self, "path", None) or "-"), self._status, elapsed_ms)

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler answers 501 (a server error) for any method without a do_<METHOD>:
        # route every method through one dispatcher so an unknown method is a 405 or 404 instead.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self) -> None:
        self._unread_body = _expected_body_bytes(self.headers)
        path = urllib.parse.urlsplit(self.path).path
        try:
            methods = ROUTES.get(path)
            if methods is None:
                raise RequestError(404, f"no endpoint {path}; the endpoints are GET /health, GET /metadata, "
                                        "POST /predict")
            if self.command not in methods:
                raise MethodNotAllowed(path, self.command, sorted(methods))
            methods[self.command](self)
        except MethodNotAllowed as err:
            self.send_json(405, {"error": str(err)}, {"Allow": ", ".join(err.allowed)})
        except RequestError as err:
            self.send_json(err.status, {"error": str(err)})
        except ConnectionError:
            logger.info("%s %s: client went away", self.command, _printable(path))
        except Exception:
            logger.exception("%s %s failed", self.command, _printable(path))
            self.send_json(500, {"error": "internal server error"})

    def health(self) -> None:
        self.send_json(200, {"status": "ok"})

    def metadata(self) -> None:
        self.send_json(200, self.server.model.metadata)

    def predict(self) -> None:
        length = self._content_length()
        media_type, params = parse_content_type(self.headers.get("Content-Type"))
        if media_type not in (JSON_TYPE, MULTIPART_TYPE):
            raise RequestError(415, f"Content-Type {media_type or '(none)'} is not accepted: send {JSON_TYPE} "
                                    f'{{"inputs": [...]}} or {MULTIPART_TYPE} with files in the field "image"')
        body = self._read_body(length)
        spec = self.server.model.spec
        if media_type == JSON_TYPE:
            batch = decode_json(body, spec)
        else:
            batch = decode_multipart(body, params.get("boundary"), spec)
        self.send_json(200, {"predictions": self.server.model.predict(batch)})

    def _content_length(self) -> int:
        """The declared body size, refused before reading: missing is 411, malformed 400, too large 413."""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "chunked or encoded bodies are not accepted: send a Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise RequestError(411, "Content-Length is required")
        if len(set(values)) != 1 or not values[0].strip().isdigit():
            raise RequestError(400, f"invalid Content-Length {', '.join(values)!r}")
        length = int(values[0])
        if length > self.server.max_body_bytes:
            raise RequestError(413, f"body of {length} bytes exceeds the limit of {self.server.max_body_bytes} "
                                    "bytes (--max-body-bytes)")
        return length

    def _read_body(self, length: int) -> bytes:
        """Exactly `length` bytes, within BODY_DEADLINE_S in total however slowly they trickle in."""
        chunks, received = [], 0
        deadline = time.monotonic() + BODY_DEADLINE_S
        try:
            while received < length:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    raise TimeoutError
                self.connection.settimeout(min(remaining_s, SOCKET_TIMEOUT_S))
                chunk = self.rfile.read1(length - received)
                if not chunk:
                    raise RequestError(400, f"body ended after {received} of the {length} bytes of Content-Length")
                chunks.append(chunk)
                received += len(chunk)
                self._unread_body = length - received
        except TimeoutError:
            self._unread_body = 0  # a stalled client is not worth draining
            raise RequestError(408, f"request body not received in time ({received} of {length} bytes)") from None
        return b"".join(chunks)

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._drain_unread_body()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by http.server itself (malformed request line, oversized headers) also answer JSON."""
        self.close_connection = True
        # A garbled request line leaves the version at HTTP/0.9, which would send the body without a status line.
        self.request_version = self.protocol_version
        self._unread_body = DRAIN_LIMIT_BYTES  # the rest of a malformed request may still be arriving
        self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # handle_one_request logs one line per request, with its duration

    def log_message(self, format: str, *args: Any) -> None:
        logger.warning("%s: %s", self.address_string(), format % args)

    def _drain_unread_body(self) -> None:
        """Read and drop what is left of a refused body (up to a limit) after answering.

        Closing a socket with unread input makes the kernel send a reset, which can destroy our
        answer before the client reads it; half-closing first and draining lets the 4xx arrive.
        """
        if self._unread_body <= 0:
            return
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(DRAIN_TIMEOUT_S)
            budget = min(self._unread_body, DRAIN_LIMIT_BYTES)
            while budget > 0 and (chunk := self.rfile.read1(min(budget, 65536))):
                budget -= len(chunk)
        self._unread_body = 0


class MethodNotAllowed(RequestError):
    def __init__(self, path: str, method: str, allowed: list[str]):
        super().__init__(405, f"{method} is not allowed on {path}; use {' or '.join(allowed)}")
        self.allowed = allowed


ROUTES: dict[str, dict[str, Any]] = {
    "/health": {"GET": PredictionHandler.health},
    "/metadata": {"GET": PredictionHandler.metadata},
    "/predict": {"POST": PredictionHandler.predict},
}


def _expected_body_bytes(headers: Any) -> int:
    """How much body may follow the headers: Content-Length, or the drain limit when it cannot be told."""
    declared = headers.get("Content-Length")
    if headers.get("Transfer-Encoding") or (declared is not None and not declared.strip().isdigit()):
        return DRAIN_LIMIT_BYTES
    return int(declared or 0)


def _printable(text: str, limit: int = 200) -> str:
    """Client-controlled text made safe for a one-line log entry."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
