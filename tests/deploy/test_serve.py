"""`dmat serve` for real: a subprocess on 127.0.0.1 queried over HTTP, serving a tiny ONNX model built without torch."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from tests.deploy.helpers import (
    TINY_CLASSES,
    as_inputs,
    class_images,
    encode_image,
    free_port,
    http_request,
    multipart,
    post_json,
    raw_request,
    running_server,
    save_tiny_classifier,
    serve_command,
    stop,
    tiny_classifier,
)

MAX_BATCH = 8
MAX_BODY_BYTES = 100_000
BIN_DIR = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    command = serve_command(str(tiny_model), "--workers", "4", "--max-batch", str(MAX_BATCH),
                            "--max-body-bytes", str(MAX_BODY_BYTES))
    with running_server(command, log) as (url, process):
        yield url
        assert process.poll() is None, f"the server died during the tests:\n{log.read_text()}"
        assert stop(process) == 0, log.read_text()


def direct_logits(model: Path, batch: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": batch})[0]


def softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def assert_predictions(predictions: list[dict], model: Path, batch: np.ndarray, labels: list[int]) -> None:
    assert [p["class_index"] for p in predictions] == labels
    assert [p["class_name"] for p in predictions] == [TINY_CLASSES[label] for label in labels]
    expected = direct_logits(model, batch)
    np.testing.assert_allclose([p["logits"] for p in predictions], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([p["probabilities"] for p in predictions], softmax64(expected), rtol=1e-6)


def test_health_and_metadata_describe_the_model(server: str, tiny_model: Path) -> None:
    assert http_request(server, "GET", "/health")[::2] == (200, {"status": "ok"})
    status, _, metadata = http_request(server, "GET", "/metadata")
    assert status == 200
    assert metadata["classes"] == list(TINY_CLASSES)
    assert metadata["input"] == {"name": "image", "shape": [3, 8, 8], "dtype": "float32", "range": [0, 1],
                                 "layout": "NCHW"}
    assert metadata["threat"] == {"norm": "Linf", "eps": 0.0313725}
    assert metadata["metrics"]["robust_acc"] == 0.31
    assert metadata["lineage"]["train_run_id"] == "abc"
    assert metadata["evaluations"]["linf"]["robust_acc"] == 0.31  # other dmat.* entries pass through
    assert metadata["sha256"] == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    assert metadata["opset"] == {"ai.onnx": 17} and metadata["ir_version"] == 8
    assert metadata["limits"] == {"max_batch": MAX_BATCH, "max_body_bytes": MAX_BODY_BYTES}
    assert metadata["source"] == {"uri": "tiny.onnx"}  # no server paths on a public endpoint


def test_json_batch_gives_classes_in_order_and_onnxruntime_logits(server: str, tiny_model: Path) -> None:
    labels = [2, 0, 1, 1, 0, 2, 2]
    batch = as_inputs(class_images(labels))
    status, payload = post_json(server, {"inputs": batch.tolist()})
    assert status == 200, payload
    assert_predictions(payload["predictions"], tiny_model, batch, labels)


def test_multipart_uploads_give_classes_in_upload_order(server: str, tiny_model: Path) -> None:
    labels = [1, 2, 0, 0, 2]
    images = class_images(labels, seed=3)
    body, content_type = multipart([("image", f"{i}.png", encode_image(image)) for i, image in enumerate(images)])
    status, _, payload = http_request(server, "POST", "/predict", body, {"Content-Type": content_type})
    assert status == 200, payload
    assert_predictions(payload["predictions"], tiny_model, as_inputs(images), labels)


def test_jpeg_uploads_and_other_form_fields(server: str) -> None:
    images = class_images([2, 1], seed=4)
    body, headers = form([("note", "note.txt", b"ignored"), ("image", "a.jpg", encode_image(images[0], "JPEG")),
                          ("image", "b.jpg", encode_image(images[1], "JPEG"))])
    status, _, payload = http_request(server, "POST", "/predict", body, headers)
    assert status == 200, payload
    assert [p["class_name"] for p in payload["predictions"]] == ["cherry", "banana"]


def form(files: list[tuple[str, str, bytes]]) -> tuple[bytes, dict[str, str]]:
    body, content_type = multipart(files)
    return body, {"Content-Type": content_type}


def image_upload(content: bytes, field: str = "image") -> tuple[bytes, dict[str, str]]:
    return form([(field, "upload.bin", content)])


def unclosed_upload() -> tuple[bytes, dict[str, str]]:
    body, headers = image_upload(encode_image(class_images([0])[0]))
    return body[:body.rindex(b"\r\n--")], headers


def json_body(document: object) -> tuple[bytes, dict[str, str]]:
    return json.dumps(document).encode(), {"Content-Type": "application/json"}


def one_image(value: float = 0.5) -> list:
    return np.full((1, 3, 8, 8), value).tolist()


def with_value(value: object) -> list:
    images = one_image()
    images[0][1][2][3] = value
    return images


def truncated_png() -> bytes:
    data = encode_image(class_images([0])[0])
    return data[:len(data) // 2]


def gif() -> bytes:
    return encode_image(class_images([0])[0], "GIF")


JSON = {"Content-Type": "application/json"}
INVALID_REQUESTS = {
    # name: (method, path, (body, headers), status, words the error message must contain)
    "malformed JSON": ("POST", "/predict", (b'{"inputs": [[', JSON), 400, "malformed JSON"),
    "not UTF-8": ("POST", "/predict", (b'{"inputs": "\xff"}', JSON), 400, "malformed JSON"),
    "missing inputs": ("POST", "/predict", json_body({"instances": one_image()}), 422, '"inputs"'),
    "not an object": ("POST", "/predict", json_body([one_image()]), 422, '"inputs"'),
    "inputs not a list": ("POST", "/predict", json_body({"inputs": "cat"}), 422, "list of images"),
    "rank 3": ("POST", "/predict", json_body({"inputs": one_image()[0]}), 422, "rank 4"),
    "wrong image size": ("POST", "/predict", json_body({"inputs": np.zeros((1, 3, 4, 4)).tolist()}), 422,
                         "3×8×8"),
    "wrong channels": ("POST", "/predict", json_body({"inputs": np.zeros((2, 1, 8, 8)).tolist()}), 422, "1×8×8"),
    "ragged": ("POST", "/predict", json_body({"inputs": [one_image()[0], [[0.5]]]}), 422, "ragged"),
    "string value": ("POST", "/predict", json_body({"inputs": with_value("0.5")}), 422, "numbers only"),
    "null value": ("POST", "/predict", json_body({"inputs": with_value(None)}), 422, "numbers only"),
    "boolean value": ("POST", "/predict", json_body({"inputs": with_value(True)}), 422, "numbers only"),
    "NaN": ("POST", "/predict", (json.dumps({"inputs": with_value(float("nan"))}).encode(), JSON), 422, "NaN"),
    "Infinity": ("POST", "/predict", (json.dumps({"inputs": with_value(float("inf"))}).encode(), JSON), 422,
                 "Infinity"),
    "overflow to inf": ("POST", "/predict", (json.dumps({"inputs": one_image()}).replace("0.5", "1e999", 1).encode(),
                                             JSON), 422, "infinite"),
    "above 1": ("POST", "/predict", json_body({"inputs": with_value(1.5)}), 422, "[0, 1]"),
    "below 0": ("POST", "/predict", json_body({"inputs": with_value(-0.01)}), 422, "min -0.01"),
    "empty batch": ("POST", "/predict", json_body({"inputs": []}), 422, "empty"),
    "batch above limit": ("POST", "/predict", json_body({"inputs": np.zeros((MAX_BATCH + 1, 3, 8, 8)).tolist()}),
                          413, "--max-batch"),
    "uploads above limit": ("POST", "/predict", form([("image", f"{i}.png", encode_image(class_images([0])[0]))
                                                      for i in range(MAX_BATCH + 1)]), 413, "--max-batch"),
    "body above limit": ("POST", "/predict", (b"[" + b" " * MAX_BODY_BYTES + b"]", JSON), 413, "--max-body-bytes"),
    "text upload": ("POST", "/predict", image_upload(b"just some text"), 422, "not a PNG or JPEG"),
    "GIF upload": ("POST", "/predict", image_upload(gif()), 422, "not a PNG or JPEG"),
    "truncated PNG": ("POST", "/predict", image_upload(truncated_png()), 422, "corrupt"),
    "upload of the wrong size": ("POST", "/predict", image_upload(encode_image(np.zeros((16, 12, 3), np.uint8))),
                                 422, "12×16 pixels (width×height); this model takes 8×8"),
    "no image field": ("POST", "/predict", image_upload(encode_image(class_images([0])[0]), field="file"), 422,
                       'field "image"'),
    "multipart without boundary": ("POST", "/predict", (b"--x\r\n\r\n--x--", {"Content-Type": "multipart/form-data"}),
                                   400, "boundary"),
    "multipart not closed": ("POST", "/predict", unclosed_upload(), 400, "closing boundary"),
    "wrong content type": ("POST", "/predict", (b"inputs=1", {"Content-Type": "text/plain"}), 415, "text/plain"),
    "no content type": ("POST", "/predict", (b"{}", {}), 415, "(none)"),
    "unknown path": ("GET", "/nowhere", (None, {}), 404, "/nowhere"),
    "GET /predict": ("GET", "/predict", (None, {}), 405, "use POST"),
    "POST /health with a body": ("POST", "/health", json_body({"inputs": one_image()}), 405, "use GET"),
    "DELETE /metadata": ("DELETE", "/metadata", (None, {}), 405, "use GET"),
    # llhttp (uvicorn's parser) refuses methods outside HTTP's registry before any route is looked up.
    "made-up method": ("BREW", "/health", (None, {}), 400, "Invalid method"),
}


@pytest.mark.parametrize("case", INVALID_REQUESTS, ids=list(INVALID_REQUESTS))
def test_invalid_request_gets_a_4xx_naming_the_problem(server: str, case: str) -> None:
    method, path, (body, headers), expected_status, words = INVALID_REQUESTS[case]
    status, response_headers, payload = http_request(server, method, path, body, headers)
    assert status == expected_status, payload
    assert words in payload["error"]
    if status == 405:
        assert response_headers["Allow"] in ("GET, HEAD", "POST")
    assert http_request(server, "GET", "/health")[0] == 200


def request_head(content_length: str | None = None, extra: str = "") -> bytes:
    lines = ["POST /predict HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def test_oversized_body_is_refused_from_content_length_before_it_is_sent(server: str) -> None:
    # Only the headers go out: a 413 proves the server judged the size without waiting for the body.
    started = time.monotonic()
    status, payload = raw_request(server, request_head(str(10**12)))
    assert (status, time.monotonic() - started < 5) == (413, True)
    assert "1000000000000 bytes" in payload["error"]


@pytest.mark.parametrize(("head", "body", "expected_status", "words"), [
    (request_head(None), b"", 411, "Content-Length is required"),
    (request_head(None, "Transfer-Encoding: chunked\r\n"), b"5\r\nhello\r\n0\r\n\r\n", 411, "chunked"),
    (request_head("12abc"), b"{}", 400, "Content-Length"),
    (request_head("-5"), b"{}", 400, "Content-Length"),
    (request_head("100"), b'{"inputs": [', 400, "body ended after 12 of the 100 bytes"),
    (b"GET /health HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n", b"", 431, "Line too long"),
    (b"NOT A REQUEST LINE\r\n\r\n", b"", 400, "request"),
], ids=["no length", "chunked", "bad length", "negative length", "short body", "header too long", "garbage"])
def test_malformed_http_gets_a_4xx(server: str, head: bytes, body: bytes, expected_status: int, words: str) -> None:
    status, payload = raw_request(server, head + body, shut_write=True)
    assert status == expected_status
    assert words.lower() in payload["error"].lower()
    assert http_request(server, "GET", "/health")[0] == 200


def test_a_refused_small_body_is_discarded_and_the_connection_kept(server: str) -> None:
    """Keep-alive survives a 4xx: the server drops the unread body instead of closing on the client."""
    parts = urllib.parse.urlsplit(server)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("POST", "/predict", b"[" + b" " * MAX_BODY_BYTES + b"]", JSON)
        response = connection.getresponse()
        assert (response.status, response.getheader("Connection")) == (413, None)
        response.read()
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200  # the same connection
    finally:
        connection.close()


def test_a_request_head_growing_without_end_is_refused(server: str) -> None:
    """A head that never completes is judged by what has arrived, not by what the parser has finished."""
    parts = urllib.parse.urlsplit(server)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nX-Long: ")
        with contextlib.suppress(ConnectionError):  # the server may close while we still send
            for _ in range(80):
                sock.sendall(b"a" * 1024)
        received = b""
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 431 ")
    assert "request head exceeds" in json.loads(received.partition(b"\r\n\r\n")[2])["error"]


def test_load_2000_requests_from_8_clients_without_errors(server: str, tiny_model: Path) -> None:
    labels = [i % 3 for i in range(2000)]
    inputs = as_inputs(class_images(labels, seed=5))
    bodies = [json.dumps({"inputs": [image.tolist()]}).encode() for image in inputs]

    def client(first: int) -> Counter:
        outcomes = Counter()
        for index in range(first, len(bodies), 8):
            try:
                status, _, payload = http_request(server, "POST", "/predict", bodies[index], JSON)
            except OSError as err:
                outcomes[f"connection error {type(err).__name__}"] += 1
                continue
            right = status == 200 and payload["predictions"][0]["class_index"] == labels[index]
            outcomes[status if right else f"{status} wrong answer"] += 1
        return outcomes

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = sum(pool.map(client, range(8)), Counter())
    elapsed = time.monotonic() - started
    assert outcomes == Counter({200: 2000}), outcomes
    print(f"2000 requests from 8 clients in {elapsed:.1f} s: {2000 / elapsed:.0f} req/s")


def test_missing_or_unreadable_metadata_falls_back_to_the_graph(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    bare = tiny_classifier(channels=1, metadata=False)
    helper.set_model_props(bare, {"dmat.classes": '["only one name"]', "dmat.threat": "{not JSON"})
    model = tmp_path / "bare.onnx"
    onnx.save(bare, str(model))
    grey = np.full((8, 8), 200, dtype=np.uint8)
    with running_server(serve_command(str(model)), tmp_path / "serve.log") as (url, process):
        status, _, metadata = http_request(url, "GET", "/metadata")
        assert status == 200
        assert metadata["classes"] == ["0", "1", "2"]
        assert metadata["input"]["shape"] == [1, 8, 8]
        assert (metadata["threat"], metadata["metrics"], metadata["lineage"]) == (None, None, None)
        body, content_type = multipart([("image", "grey.png", encode_image(grey)),
                                        ("image", "rgb.png", encode_image(class_images([1])[0]))])
        status, _, payload = http_request(url, "POST", "/predict", body, {"Content-Type": content_type})
        assert status == 200, payload
        # Every logit is 4 × the grey mean plus a bias rising with k: class "2" always wins.
        assert [p["class_name"] for p in payload["predictions"]] == ["2", "2"]
        assert payload["predictions"][0]["logits"][0] == pytest.approx(4 * 200 / 255 - 0.1, abs=1e-5)
        assert stop(process, signal.SIGINT) == 0


def test_serving_works_where_torch_cannot_be_imported(tiny_model: Path, tmp_path: Path) -> None:
    labels = [1, 0, 2]
    batch = as_inputs(class_images(labels, seed=6))
    command = serve_command(str(tiny_model), block_torch=True)
    with running_server(command, tmp_path / "serve.log") as (url, process):
        status, payload = post_json(url, {"inputs": batch.tolist()})
        assert status == 200, payload
        assert_predictions(payload["predictions"], tiny_model, batch, labels)
        assert stop(process) == 0


def test_a_model_failure_is_a_generic_500_and_the_server_stays_up(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    model = tiny_classifier()
    model.graph.node[-1].output[0] = "scores_plus_bias"
    model.graph.node.append(helper.make_node("Log", ["scores_plus_bias"], ["logits"]))  # log(negative) is NaN
    onnx.save(model, str(tmp_path / "nan.onnx"))
    log = tmp_path / "serve.log"
    with running_server(serve_command(str(tmp_path / "nan.onnx")), log) as (url, process):
        status, payload = post_json(url, {"inputs": np.zeros((1, 3, 8, 8)).tolist()})
        assert (status, payload) == (500, {"error": "internal server error"})
        assert http_request(url, "GET", "/health")[0] == 200
        assert stop(process) == 0
    assert "Traceback" in log.read_text() and "Out of range float values are not JSON compliant" in log.read_text()


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmat.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120)


def test_unusable_model_or_port_exits_1_naming_the_problem(tmp_path: Path, tiny_model: Path) -> None:
    missing = run_serve(str(tmp_path / "absent.onnx"))
    assert missing.returncode == 1 and "absent.onnx not found" in missing.stderr
    (tmp_path / "fake.onnx").write_text("not a model")
    broken = run_serve(str(tmp_path / "fake.onnx"))
    assert broken.returncode == 1 and "onnxruntime cannot load" in broken.stderr
    with running_server(serve_command(str(tiny_model)), tmp_path / "serve.log") as (url, process):
        taken = run_serve(str(tiny_model), "--port", url.rsplit(":", 1)[1])
        assert taken.returncode == 1 and "cannot listen on 127.0.0.1" in taken.stderr
        assert stop(process) == 0
    usage = run_serve(str(tiny_model), "--max-batch", "0")
    assert usage.returncode == 2 and "--max-batch" in usage.stderr


# The registry: two versions of the tiny classifier in a temporary sqlite store, alias `champion` on version 1.
REGISTER = """
import sys
import mlflow, numpy as np, onnx, onnxruntime
from mlflow.models import infer_signature

uri, artifacts, first, second = sys.argv[1:]
mlflow.set_tracking_uri(uri)
mlflow.set_experiment(experiment_id=mlflow.create_experiment("serve-test", artifact_location=artifacts))
for path in (first, second):
    model = onnx.load(path)
    example = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    logits = onnxruntime.InferenceSession(path).run(["logits"], {"image": example})[0]
    with mlflow.start_run():
        mlflow.onnx.log_model(model, name="model", registered_model_name="dmat-tiny", input_example=example,
                              signature=infer_signature(example, {"logits": logits}))
mlflow.MlflowClient().set_registered_model_alias("dmat-tiny", "champion", "1")
"""


@pytest.fixture(scope="module")
def registry(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    renamed = save_tiny_classifier(root / "renamed.onnx", classes=("x", "y", "z"))
    done = subprocess.run([sys.executable, "-c", REGISTER, uri, (root / "artifacts").as_uri(), str(tiny_model),
                           str(renamed)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return uri


@pytest.mark.slow
def test_serves_a_registered_alias_without_torch(registry: str, tiny_model: Path, tmp_path: Path) -> None:
    labels = [2, 1]
    batch = as_inputs(class_images(labels, seed=7))
    command = serve_command("models:/dmat-tiny@champion", block_torch=True)
    # The working directory has no mlflow.db: only MLFLOW_TRACKING_URI can lead to the registry.
    with running_server(command, tmp_path / "serve.log", env={"MLFLOW_TRACKING_URI": registry},
                        cwd=tmp_path) as (url, process):
        metadata = http_request(url, "GET", "/metadata")[2]
        assert metadata["source"] == {"uri": "models:/dmat-tiny@champion", "name": "dmat-tiny", "alias": "champion",
                                      "version": "1"}
        assert metadata["classes"] == list(TINY_CLASSES)  # version 1's names: version 2 calls them x, y, z
        status, payload = post_json(url, {"inputs": batch.tolist()})
        assert status == 200, payload
        assert_predictions(payload["predictions"], tiny_model, batch, labels)
        assert stop(process) == 0


@pytest.mark.slow
def test_unknown_registered_model_exits_1(registry: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dmat.cli", "serve", "models:/dmat-tiny@nobody"], cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": registry}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "cannot resolve models:/dmat-tiny@nobody" in done.stderr


@pytest.mark.slow
def test_mlflow_models_serve_answers_the_registered_champion(registry: str, tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "mlflow-serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}"}
    command = [str(BIN_DIR / "mlflow"), "models", "serve", "-m", "models:/dmat-tiny@champion", "--env-manager",
               "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as sink:
        # Its own process group: `mlflow models serve` starts uvicorn as a child, and both must stop.
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                   start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ping(url, process, log)
        batch = as_inputs(class_images([0, 2, 1], seed=8))
        status, _, payload = http_request(url, "POST", "/invocations",
                                          json.dumps({"inputs": batch.tolist()}).encode(), JSON)
        assert status == 200, payload
        np.testing.assert_allclose(payload["predictions"]["logits"], direct_logits(tiny_model, batch), rtol=1e-6,
                                   atol=1e-6)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def wait_for_ping(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            if http_request(url, "GET", "/ping", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow models serve not ready after {timeout} s:\n{log.read_text(errors='replace')}")
