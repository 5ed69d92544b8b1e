"""`dmat serve` under load beside `mlflow models serve`, the previous `dmat serve` and onnxruntime in-process.

Model: the CPU-default classifier, wrn-16-1 (models/export/classifier.onnx after a pipeline run,
else a freshly initialised wrn-16-1 exported with the export stage's own exporter), registered in a
temporary MLflow registry as models:/dmat-bench@champion, which every server loads.

Servers, all started once and then measured in turn:
- `dmat serve` with dynamic batching (defaults) and with it off (--batch-window-ms 0), each asked
  with JSON (POST /predict) and with binary tensors (POST /v2/models/dmat-bench/infer); and with
  batching but without the per-request log line (--no-access-log), binary;
- the previous `dmat serve` (http.server, from git at OLD_SERVER_REV), JSON;
- `mlflow models serve` (its defaults: one uvicorn worker), JSON on /invocations.
Load: benchmarks/serve_load.py in its own process, CLIENT_COUNTS concurrent keep-alive clients
sending batch-1 requests of distinct random images, WARMUP_S uncounted then DURATION_S counted.
Rounds interleave all servers (in a rotating order) so that drift on a shared machine hits each
alike; ratios are formed within a round. Reported per server and client count: req/s (one image
per request, so also inferences/s) as median and min-max over ROUNDS, p50/p95 (medians over
rounds), 5xx and other failures summed, and the server's CPU time per request (its process and
children, user + system): unlike req/s, that cost hardly depends on what else the machine runs.
The floor: the same ONNX file in this process's onnxruntime (batch-1 latency; throughput at batch
1 and at batch 32). The load generator shares the machine's cores with the server under test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import psutil
from tests.deploy.helpers import REPO_ROOT, free_port, http_request, running_server, serve_command

from benchmarks.serve_load import write_requests

PIPELINE_MODEL = REPO_ROOT / "models" / "export" / "classifier.onnx"
OLD_SERVER_REV = "13f6085"  # the last commit whose `dmat serve` ran on http.server
REGISTERED = "dmat-bench"
CLIENT_COUNTS = (8, 32)
ROUNDS = 5
WARMUP_S = 1.0
DURATION_S = 5.0
DISTINCT_IMAGES = 64
BIN_DIR = Path(sys.executable).parent


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, contextlib.ExitStack() as servers:
        root = Path(tmp)
        model, origin = classifier_onnx(root)
        uri = register(model, root)
        env = {"MLFLOW_TRACKING_URI": uri}
        champion = f"models:/{REGISTERED}@champion"
        shape = tuple(onnxruntime.InferenceSession(str(model)).get_inputs()[0].shape[1:])
        images = np.random.default_rng(0).random((DISTINCT_IMAGES, *shape), dtype=np.float32)
        batching = servers.enter_context(running_server(serve_command(champion), root / "batching.log", env=env))
        unbatched = servers.enter_context(running_server(serve_command(champion, "--batch-window-ms", "0"),
                                                         root / "unbatched.log", env=env))
        quiet = servers.enter_context(running_server(serve_command(champion, "--no-access-log"), root / "quiet.log",
                                                     env=env))
        mlflow = servers.enter_context(mlflow_server(champion, root, env))
        infer = f"/v2/models/{REGISTERED}/infer"
        targets = {
            "dmat serve, batching, JSON": (*batching, "/predict", json_requests(images)),
            "dmat serve, batching, binary": (*batching, infer, binary_requests(images)),
            "dmat serve, no batching, JSON": (*unbatched, "/predict", json_requests(images)),
            "dmat serve, no batching, binary": (*unbatched, infer, binary_requests(images)),
            "dmat serve, batching, binary, --no-access-log": (*quiet, infer, binary_requests(images)),
            "mlflow models serve, JSON": (*mlflow, "/invocations", json_requests(images)),
        }
        old = old_server(root, champion, env)
        if isinstance(old, str):
            skipped = {"previous dmat serve": old}
        else:
            skipped = {}
            targets["previous dmat serve, JSON"] = (*servers.enter_context(old), "/predict", json_requests(images))
        rounds = [measure_round(targets, root, number) for number in range(ROUNDS)]
        floors = [onnxruntime_floor(model, images) for _ in range(ROUNDS)]
    return {"model": origin, "input_shape": list(shape), "rounds": ROUNDS, "duration_s": DURATION_S,
            "cpus": os.cpu_count(), "skipped": skipped, "servers": summarize(rounds),
            "onnxruntime_in_process": {key: _spread([f[key] for f in floors]) for key in floors[0]},
            "ratios": ratios(rounds)}


def classifier_onnx(root: Path) -> tuple[Path, str]:
    if PIPELINE_MODEL.is_file():
        return PIPELINE_MODEL, f"{PIPELINE_MODEL.relative_to(REPO_ROOT)} (pipeline output)"
    import torch

    from dmat.core.classifiers import build_classifier
    from dmat.onnx_contract import encode_metadata
    from dmat.stages.export import EXAMPLE_BATCH, export_classifier_onnx

    torch.manual_seed(0)
    network = build_classifier("wrn-16-1", num_classes=10, mean=(0.4914, 0.4822, 0.4465),
                               std=(0.2471, 0.2435, 0.2616)).eval()
    path = root / "wrn-16-1.onnx"
    export_classifier_onnx(network, torch.rand(EXAMPLE_BATCH, 3, 32, 32), path,
                           encode_metadata({"classes": [f"class{k}" for k in range(10)]}))
    return path, "freshly initialised wrn-16-1, exported by dmat.deploy.export.export_classifier_onnx"


def register(model: Path, root: Path) -> str:
    """A sqlite MLflow registry in `root` with `model` as version 1 of REGISTERED, alias champion."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("bench-serve", artifact_location=(root / "artifacts").as_uri())
    example = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    logits = onnxruntime.InferenceSession(str(model)).run(["logits"], {"image": example})[0]
    with mlflow.start_run(experiment_id=experiment):
        mlflow.onnx.log_model(onnx.load(str(model)), name="model", registered_model_name=REGISTERED,
                              input_example=example, signature=infer_signature(example, {"logits": logits}))
    mlflow.MlflowClient().set_registered_model_alias(REGISTERED, "champion", "1")
    return uri


@contextlib.contextmanager
def mlflow_server(model_uri: str, root: Path, env: dict[str, str]):
    port = free_port()
    log = root / "mlflow-serve.log"
    command = [str(BIN_DIR / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "--host",
               "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as sink:
        # Its own process group: `mlflow models serve` starts uvicorn as a child, and both must stop.
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **env, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _answers(url, "/ping"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.5)
        yield url, process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _answers(url: str, path: str) -> bool:
    try:
        return http_request(url, "GET", path, timeout=5)[0] == 200
    except OSError:
        return False


def old_server(root: Path, model_uri: str, env: dict[str, str]):
    """The previous `dmat serve` from git, or why it cannot run (a string)."""
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", OLD_SERVER_REV, "src"],
                             capture_output=True)
    if archive.returncode != 0:
        return f"git cannot give {OLD_SERVER_REV}: {archive.stderr.decode(errors='replace').strip()}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root / "old", filter="data")
    return running_server(serve_command(model_uri), root / "old-serve.log",
                          env={**env, "PYTHONPATH": str(root / "old" / "src")})


def json_requests(images: np.ndarray) -> list[dict]:
    return [{"body": json.dumps({"inputs": [image.tolist()]}).encode(), "type": "application/json"}
            for image in images]


def binary_requests(images: np.ndarray) -> list[dict]:
    requests = []
    for image in images:
        raw = np.ascontiguousarray(image[None], dtype="<f4").tobytes()
        header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, *image.shape],
                                         "parameters": {"binary_data_size": len(raw)}}],
                             "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
        requests.append({"body": header + raw, "type": "application/octet-stream",
                         "extra": f"Inference-Header-Content-Length: {len(header)}\r\n"})
    return requests


def request_file(url: str, path: str, requests: list[dict], destination: Path) -> Path:
    host = url.removeprefix("http://")
    write_requests(destination, [
        (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {r['type']}\r\nContent-Length: {len(r['body'])}\r\n"
         f"{r.get('extra', '')}\r\n").encode() + r["body"] for r in requests])
    return destination


def measure_round(targets: dict, root: Path, number: int) -> dict:
    """One load run per target and client count, the targets in an order rotated by `number`."""
    names = list(targets)
    names = names[number % len(names):] + names[:number % len(names)]
    results = {}
    for clients in CLIENT_COUNTS:
        for name in names:
            url, server, path, requests = targets[name]
            file = request_file(url, path, requests, root / "requests.bin")
            host, port = url.removeprefix("http://").rsplit(":", 1)
            cpu_before = cpu_seconds(server.pid)
            done = subprocess.run([sys.executable, "-m", "benchmarks.serve_load", host, port, str(file), "--clients",
                                   str(clients), "--warmup", str(WARMUP_S), "--duration", str(DURATION_S)],
                                  capture_output=True, text=True, cwd=REPO_ROOT, timeout=120 + DURATION_S)
            if done.returncode != 0:
                raise RuntimeError(f"load generator failed against {name}:\n{done.stderr}")
            results[(name, clients)] = {**json.loads(done.stdout), "server_cpu_s": cpu_seconds(server.pid) - cpu_before}
            print(f"round {number + 1}, {clients} clients, {name}: {results[(name, clients)]}", file=sys.stderr)
    return results


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (mlflow's server runs in a child)."""
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(t.user + t.system for t in (process.cpu_times() for process in processes))


def onnxruntime_floor(model: Path, images: np.ndarray) -> dict:
    """The same file in this process, with the server's session options: batch-1 latency and images/s."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    single = []
    for image in images[:32].repeat(8, axis=0):
        started = time.perf_counter()
        session.run(None, {"image": image[None]})
        single.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(8):
        session.run(None, {"image": images[:32]})
    batched = time.perf_counter() - started
    return {"batch1_p50_ms": round(float(np.median(single)) * 1000, 3),
            "batch1_images_per_s": round(len(single) / sum(single), 1),
            "batch32_images_per_s": round(8 * 32 / batched, 1)}


def summarize(rounds: list[dict]) -> dict:
    table = {}
    for key in rounds[0]:
        runs = [r[key] for r in rounds]
        statuses = [run["statuses"] for run in runs]
        table[f"{key[0]} @ {key[1]} clients"] = {
            "req_per_s": _spread([run["requests"] / run["seconds"] for run in runs]),
            "p50_ms": statistics.median(run["p50_ms"] for run in runs),
            "p95_ms": statistics.median(run["p95_ms"] for run in runs),
            "5xx": sum(n for s in statuses for status, n in s.items() if int(status) >= 500),
            "other_non_200": sum(n for s in statuses for status, n in s.items() if int(status) < 500
                                 and int(status) != 200),
            "connection_errors": sum(run["connection_errors"] for run in runs),
            "server_cpu_ms_per_request": round(1000 * statistics.median(
                run["server_cpu_s"] / run["answered_incl_warmup"] for run in runs), 3),
        }
    return table


def ratios(rounds: list[dict]) -> dict:
    """Per-round ratios of req/s (the acceptance comparisons), summarized over rounds."""
    def rate(r: dict, name: str, clients: int) -> float | None:
        run = r.get((name, clients))
        return run["requests"] / run["seconds"] if run else None

    wanted = {"batching JSON / mlflow": ("dmat serve, batching, JSON", "mlflow models serve, JSON"),
              "batching binary / mlflow": ("dmat serve, batching, binary", "mlflow models serve, JSON"),
              "batching JSON / previous dmat serve": ("dmat serve, batching, JSON", "previous dmat serve, JSON"),
              "no batching JSON / previous dmat serve": ("dmat serve, no batching, JSON", "previous dmat serve, JSON"),
              "batching binary / no batching binary": ("dmat serve, batching, binary",
                                                       "dmat serve, no batching, binary")}
    summary = {}
    for label, (top, bottom) in wanted.items():
        for clients in CLIENT_COUNTS:
            values = [rate(r, top, clients) / rate(r, bottom, clients) for r in rounds
                      if rate(r, top, clients) and rate(r, bottom, clients)]
            if values:
                summary[f"{label} @ {clients} clients"] = _spread(values, digits=2)
    return summary


def _spread(values: list[float], digits: int = 1) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}
