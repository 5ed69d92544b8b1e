"""A tiny ONNX classifier built without torch, a real `dmat serve` subprocess, and small HTTP helpers.

Shared by tests/deploy and benchmarks/bench_serve.py; nothing here imports torch.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CLASSES = ("apple", "banana", "cherry")
TINY_SHAPE = (3, 8, 8)
STARTUP_TIMEOUT_S = 120.0
URL_LINE = re.compile(r"listening on (http://\S+)")

# Makes `import torch` (and anything under it) fail in the process, as on a serving image without torch.
BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, _NoTorch())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("the torch blocker did not block torch")
"""
RUN_CLI = "from dmat.cli import main; sys.exit(main())"


def tiny_classifier(*, channels: int = 3, size: int = 8, classes: tuple[str, ...] | None = TINY_CLASSES,
                    metadata: bool = True) -> Any:
    """Flatten -> MatMul -> Add: logit k is 4 × the mean of channel k % C, so the brightest channel wins.

    Follows the export contract: input `image` float32 [N, C, H, W] with a dynamic batch, output
    `logits` [N, K], JSON metadata_props under dmat.* (left out when `metadata` is False).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    count = len(classes) if classes else 3
    pixels = size * size
    weights = np.zeros((channels * pixels, count), dtype=np.float32)
    for k in range(count):
        channel = k % channels
        weights[channel * pixels:(channel + 1) * pixels, k] = 4.0 / pixels
    bias = np.linspace(-0.1, 0.1, count, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "weights"], ["scores"]),
         helper.make_node("Add", ["scores", "bias"], ["logits"])],
        "tiny_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", count])],
        initializer=[numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if metadata:
        helper.set_model_props(model, {f"dmat.{key}": json.dumps(value) for key, value in {
            "classes": list(classes),
            "input": {"name": "image", "shape": [channels, size, size], "dtype": "float32", "range": [0, 1],
                      "layout": "NCHW"},
            "threat": {"norm": "Linf", "eps": 0.0313725},
            "metrics": {"clean_acc": 0.52, "robust_acc": 0.31, "n": 1000, "attack": "autoattack-standard"},
            "lineage": {"git_commit": "0" * 40, "train_run_id": "abc", "evaluate_run_ids": {"autoattack": "def"},
                        "data_sha256": {"train": "1" * 64}},
            "evaluations": {"linf": {"norm": "Linf", "eps": 0.0313725, "robust_acc": 0.31}},
        }.items()})
    onnx.checker.check_model(model, full_check=True)
    return model


def save_tiny_classifier(path: Path, **kwargs: Any) -> Path:
    import onnx

    onnx.save(tiny_classifier(**kwargs), str(path))
    return path


def class_images(labels: list[int], *, size: int = 8, seed: int = 0) -> np.ndarray:
    """uint8 N×H×W×3 images whose brightest channel is the label (what the tiny classifier predicts)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), size, size, 3))
    for row, label in enumerate(labels):
        images[row, :, :, label % 3] += 180
    return images.astype(np.uint8)


def as_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×C -> float32 N×C×H×W in [0, 1], as the server decodes uploads."""
    return (images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)).astype(np.float32)


def encode_image(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def multipart(files: list[tuple[str, str, bytes]], boundary: str = "dmat-test-boundary-7f3a") -> tuple[bytes, str]:
    """(body, content type) for form-data parts given as (field, filename, content)."""
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n"
                    for field, name, content in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def http_request(url: str, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, Any, Any]:
    """(status, headers, body) of one request on a fresh connection; a JSON body comes decoded.

    The headers are http.client's message object: names are case-insensitive, as in HTTP.
    """
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        if (response.getheader("Content-Type") or "").startswith("application/json") and payload.strip():
            payload = json.loads(payload)
        return response.status, response.headers, payload
    finally:
        connection.close()


def post_json(url: str, document: Any) -> tuple[int, Any]:
    status, _, payload = http_request(url, "POST", "/predict", json.dumps(document).encode(),
                                      {"Content-Type": "application/json"})
    return status, payload


def raw_request(url: str, data: bytes, *, shut_write: bool = False, timeout: float = 10.0) -> tuple[int, Any]:
    """Send bytes as they are (headers we choose, maybe no body) and parse the status and JSON answer."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else None


def serve_command(model: str, *args: str, block_torch: bool = False) -> list[str]:
    prefix = [sys.executable, "-c", f"{BLOCK_TORCH}\n{RUN_CLI}"] if block_torch else [sys.executable, "-m",
                                                                                      "dmat.cli"]
    return [*prefix, "serve", model, "--port", "0", *args]


@contextmanager
def running_server(command: list[str], log: Path, env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start a server whose output goes to `log`, yield (URL, process) once /health answers, stop it with SIGTERM.

    The caller checks the exit code; output goes to a file because a full pipe would stall the server.
    """
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd,
                                   env={**os.environ, **(env or {})})
    try:
        url = wait_until_listening(process, log)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_listening(process: subprocess.Popen, log: Path, timeout: float = STARTUP_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := URL_LINE.search(log.read_text(errors="replace")):
            status, _, payload = http_request(match[1], "GET", "/health")
            if status == 200 and payload == {"status": "ok"}:
                return match[1]
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    raise RuntimeError(f"server not listening after {timeout} s:\n{log.read_text(errors='replace')}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    process.send_signal(sig)
    return process.wait(timeout=timeout)
