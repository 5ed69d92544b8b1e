"""`dmat serve MODEL`: an ONNX classifier over HTTP, on uvicorn (app.py has the endpoints).

The simple API (GET /health, GET /metadata, POST /predict), the Open Inference Protocol under /v2
(KServe v2 / Triton clients, JSON or binary tensors) and GET /metrics (Prometheus). One
onnxruntime session; concurrent requests are gathered into one onnxruntime call by the dynamic
batcher (--max-batch images or --batch-window-ms, whichever comes first), run on --workers
threads. uvicorn serves HTTP/1.1 with keep-alive on one event loop; connections beyond
MAX_CONNECTIONS get a 503. Binds 127.0.0.1 unless told otherwise, stops cleanly (exit 0) on
SIGTERM or SIGINT after answering the requests in flight. Only the standard library is imported
at module level: cli.py imports this module to build its parser, and serving must work where torch
is not installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import Any

from dmat import __version__

logger = logging.getLogger("dmat.serve")

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
DEFAULT_WORKERS = 1
DEFAULT_MAX_BATCH = 64
DEFAULT_BATCH_WINDOW_MS = 2.0
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_CONNECTIONS = 1024  # open connections and requests at once; beyond it uvicorn answers 503
BACKLOG = 2048
KEEP_ALIVE_S = 5  # a silent keep-alive connection is closed after this long
GRACEFUL_STOP_S = 30  # on SIGTERM, how long requests in flight may still take
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Endpoints: GET /health; GET /metadata (classes, input contract, threat model, metrics, lineage, "
                     'sha256, opset); POST /predict with JSON {"inputs": N×C×H×W values in [0, 1]} or multipart '
                     "form-data PNG/JPEG files in the field `image` (of the model's exact size); the Open Inference "
                     "Protocol (KServe v2, Triton clients): GET /v2/health/live, /v2/health/ready, /v2/models/NAME, "
                     "/v2/models/NAME/ready, POST /v2/models/NAME/infer with JSON or binary FP32 tensors (NAME: the "
                     "registered model's name or the file's stem); GET /metrics (Prometheus). Client errors are 4xx "
                     "JSON {\"error\": ...}. SIGTERM or SIGINT stops the server (exit 0).")
    parser.add_argument("model", metavar="MODEL",
                        help="a .onnx file, or models:/<name>@<alias> or models:/<name>/<version> from the MLflow "
                             "registry (MLFLOW_TRACKING_URI; default sqlite:///<project root>/mlflow.db)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; the server has no "
                             "authentication, so expose it with care)")
    parser.add_argument("--port", type=_port, default=8080, help="TCP port (default 8080; 0 picks a free one, "
                                                                 "printed with the URL)")
    parser.add_argument("--workers", type=_positive_int, default=DEFAULT_WORKERS,
                        help="onnxruntime calls running at once, each on its own thread sharing one session with "
                             "max(1, CPUs // workers) onnxruntime threads (default "
                             f"{DEFAULT_WORKERS}: one call at a time using every core)")
    parser.add_argument("--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH,
                        help="most images per request (more is a 413) and per onnxruntime call "
                             f"(default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--batch-window-ms", type=_window_ms, default=DEFAULT_BATCH_WINDOW_MS,
                        help="how long a request may wait for others to share its onnxruntime call (dynamic "
                             "batching); requests that queued while the model was busy join without waiting; 0 "
                             f"turns batching off: one call per request (default {DEFAULT_BATCH_WINDOW_MS:g})")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted, judged from Content-Length before reading it; "
                             f"more is a 413 (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="log one line per request: method, path, status, milliseconds (default: on; "
                             "/metrics counts every request either way)")


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


def _window_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{value:g} ms is outside 0-1000")
    return value


def run(args: argparse.Namespace) -> int:
    from dmat.deploy import model as served_model

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
    model.metadata["v2"] = {"model_name": model.name, "model_version": model.version,
                            "infer": f"/v2/models/{model.name}/infer"}
    try:
        listener = _listen(args.host, args.port)
    except OSError as err:
        return _fail(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}", EXIT_FAILED)
    return serve_until_signalled(listener, model, args)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fail(message: object, code: int) -> int:
    print(f"dmat serve: error: {message}", file=sys.stderr)
    return code


def _listen(host: str, port: int) -> socket.socket:
    """Bound and listening before uvicorn starts, so a taken port is our clear error and port 0 is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def serve_until_signalled(listener: socket.socket, model: Any, args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then answer the requests in flight and exit 0."""
    import uvicorn

    from dmat.deploy.app import create_app
    from dmat.deploy.batching import DynamicBatcher
    from dmat.deploy.metrics import ServerMetrics
    from dmat.deploy.protocol import LimitedHttpToolsProtocol

    metrics = ServerMetrics(model)
    batcher = DynamicBatcher(model.logits, max_batch=args.max_batch, window_s=args.batch_window_ms / 1000,
                             workers=args.workers, observe=metrics.observe_batch)
    app = create_app(model, batcher, metrics, max_body_bytes=args.max_body_bytes, access_log=args.access_log)
    config = uvicorn.Config(app, http=LimitedHttpToolsProtocol, ws="none", lifespan="off", log_config=None,
                            access_log=False, proxy_headers=False, server_header=False,
                            headers=[("server", f"dmat-serve/{__version__}")], limit_concurrency=MAX_CONNECTIONS,
                            backlog=BACKLOG, timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=GRACEFUL_STOP_S)
    server = uvicorn.Server(config)
    # uvicorn handles the signals while it serves, then re-raises them: these handlers take them, for exit 0.
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    host, port = listener.getsockname()[:2]
    if host not in LOOPBACK_HOSTS:
        logger.warning("listening on %s: reachable from other machines, without authentication", host)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    print(f"dmat serve: listening on {url} (Open Inference Protocol model {model.name})", flush=True)
    try:
        server.run(sockets=[listener])
    finally:
        batcher.close()
        listener.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped (%s)", signal.Signals(stop[0]).name if stop else "exiting")
    return EXIT_OK
