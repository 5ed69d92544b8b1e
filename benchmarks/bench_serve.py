"""`dmat serve` under load: 8 concurrent clients × N batch-1 JSON requests, against in-process onnxruntime (baseline).

For the tiny test classifier (3×8×8) and, when it exists, models/export/classifier.onnx: a real
server subprocess on 127.0.0.1 (default --workers), 8 client threads each sending its share of
`REQUESTS` batch-1 JSON requests on fresh connections; throughput (req/s), p50/p95/p99 latency as
the client sees it, and the count of non-200 answers and connection errors (both should be 0). The
baseline is the same single-image inference run directly on an onnxruntime session in this process,
so `p50_over_direct` is what HTTP, JSON and the request thread cost on top of inference. The clients
run on the same machine as the server and share its cores: the figures are a floor, not a ceiling.
"""

from __future__ import annotations

import concurrent.futures
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
from tests.deploy.helpers import http_request, running_server, save_tiny_classifier, serve_command

REAL_MODEL = Path(__file__).resolve().parents[1] / "models" / "export" / "classifier.onnx"
CLIENTS = 8
REQUESTS = 2000
WARMUP_REQUESTS = 50
DIRECT_RUNS = 500


def run() -> dict:
    results = {"clients": CLIENTS, "requests": REQUESTS}
    with tempfile.TemporaryDirectory() as tmp:
        results["tiny_3x8x8"] = measure(save_tiny_classifier(Path(tmp) / "tiny.onnx"), Path(tmp))
        if REAL_MODEL.is_file():
            results["export_classifier"] = measure(REAL_MODEL, Path(tmp))
        else:
            results["export_classifier"] = {"skipped": f"{REAL_MODEL} not found (run `dvc repro export`)"}
    return results


def measure(model: Path, tmp: Path) -> dict:
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    shape = [dim if isinstance(dim, int) else 1 for dim in session.get_inputs()[0].shape]
    images = np.random.default_rng(0).random((REQUESTS, *shape[1:]), dtype=np.float32)
    bodies = [json.dumps({"inputs": [image.tolist()]}).encode() for image in images]
    direct_ms = direct_latencies_ms(session, images[:DIRECT_RUNS])
    with running_server(serve_command(str(model)), tmp / f"{model.stem}-serve.log") as (url, _):
        for body in bodies[:WARMUP_REQUESTS]:
            http_request(url, "POST", "/predict", body, {"Content-Type": "application/json"})
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            outcomes = list(pool.map(lambda client: send(url, bodies[client::CLIENTS]), range(CLIENTS)))
        elapsed = time.perf_counter() - started
    latencies = np.concatenate([np.asarray(ms) for ms, _ in outcomes])
    failures = sum(failed for _, failed in outcomes)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {
        "input_shape": shape[1:],
        "request_bytes": len(bodies[0]),
        "req_per_s": round(REQUESTS / elapsed, 1),
        "p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2),
        "failures": failures,
        "direct_p50_ms": round(float(np.median(direct_ms)), 3),
        "p50_over_direct": round(float(p50 / np.median(direct_ms)), 1),
    }


def send(url: str, bodies: list[bytes]) -> tuple[list[float], int]:
    """Latency of each successful request in ms, and the number of failed ones (non-200 or connection error)."""
    latencies, failed = [], 0
    for body in bodies:
        started = time.perf_counter()
        try:
            status = http_request(url, "POST", "/predict", body, {"Content-Type": "application/json"})[0]
        except OSError:
            status = None
        if status == 200:
            latencies.append((time.perf_counter() - started) * 1000)
        else:
            failed += 1
    return latencies, failed


def direct_latencies_ms(session: onnxruntime.InferenceSession, images: np.ndarray) -> list[float]:
    name = session.get_inputs()[0].name
    latencies = []
    for image in images:
        started = time.perf_counter()
        session.run(None, {name: image[None]})
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies
