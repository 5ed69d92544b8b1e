"""The Open Inference Protocol of `dmat serve`, spoken by a client nobody here wrote (tritonclient), and /metrics.

A real `dmat serve` subprocess on 127.0.0.1 serves the tiny ONNX classifier; every answer is
compared with onnxruntime's on the same inputs. The batching tests send many concurrent requests
with distinct inputs and check that each gets exactly its own rows, and (from /metrics) that
requests really were gathered into shared onnxruntime calls of at most --max-batch images.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.deploy.helpers import TINY_CLASSES, http_request, running_server, save_tiny_classifier, serve_command, stop

MAX_BATCH = 8
WINDOW_MS = 20  # wide, so that concurrent test requests surely meet in one call
MODEL = "tiny"  # a .onnx file is served under its stem, version "1"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("model") / f"{MODEL}.onnx")


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    command = serve_command(str(tiny_model), "--max-batch", str(MAX_BATCH), "--batch-window-ms", str(WINDOW_MS),
                            "--max-body-bytes", "100000")
    with running_server(command, log) as (url, process):
        yield url
        assert process.poll() is None, f"the server died during the tests:\n{log.read_text()}"
        assert stop(process) == 0, log.read_text()


@pytest.fixture()
def client(server: str):
    connection = triton.InferenceServerClient(server.removeprefix("http://"))
    yield connection
    connection.close()


def direct_logits(model: Path, batch: np.ndarray) -> np.ndarray:
    return onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": batch})[0]


def random_batch(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, 8, 8), dtype=np.float32)


def infer(client: triton.InferenceServerClient, batch: np.ndarray, *, binary: bool, outputs=("logits",),
          **kwargs) -> triton.InferResult:
    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    requested = [triton.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer(MODEL, [tensor], outputs=requested, **kwargs)


def test_health_and_metadata_through_tritonclient(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("another") and not client.is_model_ready(MODEL, "2")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata(MODEL)
    assert (metadata["name"], metadata["versions"]) == (MODEL, ["1"])
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
                                   {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert metadata["parameters"]["classes"] == list(TINY_CLASSES)
    with pytest.raises(InferenceServerException, match="unknown model another") as refused:
        client.get_model_metadata("another")
    assert refused.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensors", "JSON tensors"])
def test_infer_equals_onnxruntime(client: triton.InferenceServerClient, tiny_model: Path, binary: bool) -> None:
    batch = random_batch(5, seed=1)
    result = infer(client, batch, binary=binary, outputs=("logits", "probabilities"), request_id="req-7")
    expected = direct_logits(tiny_model, batch)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-6, atol=1e-6)
    shifted = np.exp(expected.astype(np.float64) - expected.max(axis=1, keepdims=True))
    np.testing.assert_allclose(result.as_numpy("probabilities"), shifted / shifted.sum(axis=1, keepdims=True),
                               rtol=1e-6)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (MODEL, "1", "req-7")
    assert all(("parameters" in output) == binary for output in response["outputs"])


def test_infer_without_named_outputs_gives_logits_and_a_version_in_the_path(client: triton.InferenceServerClient,
                                                                           tiny_model: Path) -> None:
    batch = random_batch(2, seed=2)
    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    result = client.infer(MODEL, [tensor], model_version="1")
    assert [output["name"] for output in result.get_response()["outputs"]] == ["logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), direct_logits(tiny_model, batch), rtol=1e-6, atol=1e-6)


def test_bad_requests_raise_in_tritonclient_with_the_servers_reason(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match=r"C×H×W must be 3×8×8") as wrong_size:
        infer(client, np.zeros((1, 3, 4, 4), np.float32), binary=True)
    assert wrong_size.value.status() == "400"
    with pytest.raises(InferenceServerException, match=r"\[0, 1\]"):
        infer(client, np.full((1, 3, 8, 8), 2.0, np.float32), binary=True)
    with pytest.raises(InferenceServerException, match="exceeds the limit of 8") as too_many:
        infer(client, random_batch(MAX_BATCH + 1, seed=3), binary=False)
    assert too_many.value.status() == "413"


def oip_request(inputs: list[dict], *, outputs: list[dict] | None = None, binary: bytes = b"") -> tuple[bytes, dict]:
    header = json.dumps({"inputs": inputs, **({"outputs": outputs} if outputs is not None else {})}).encode()
    extra = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
    return header + binary, extra


def image_tensor(shape: list, **fields) -> dict:
    return {"name": "image", "datatype": "FP32", "shape": shape, **fields}


ONE = [1, 3, 8, 8]
ZEROS = [0.0] * 192
RAW = np.zeros(192, "<f4").tobytes()
INFER = f"/v2/models/{MODEL}/infer"
INVALID_INFER = {
    # name: (path, (body, extra headers), status, words the error must contain)
    "unknown model": ("/v2/models/other/infer", oip_request([image_tensor(ONE, data=ZEROS)]), 404, "unknown model"),
    "unknown version": (f"/v2/models/{MODEL}/versions/9/infer", oip_request([image_tensor(ONE, data=ZEROS)]), 404,
                        "version 9"),
    "malformed JSON": (INFER, (b'{"inputs": [', {}), 400, "malformed JSON"),
    "no inputs": (INFER, oip_request([]), 400, "one tensor"),
    "wrong input name": (INFER, oip_request([{**image_tensor(ONE, data=ZEROS), "name": "x"}]), 400, "unknown input"),
    "INT32": (INFER, oip_request([{**image_tensor(ONE, data=[0] * 192), "datatype": "INT32"}]), 400, "FP32"),
    "rank 3": (INFER, oip_request([image_tensor([3, 8, 8], data=ZEROS)]), 400, "rank 4"),
    "too few values": (INFER, oip_request([image_tensor(ONE, data=ZEROS[:-1])]), 400, "191 values"),
    "strings": (INFER, oip_request([image_tensor(ONE, data=["0"] * 192)]), 400, "numbers only"),
    "no data": (INFER, oip_request([image_tensor(ONE)]), 400, '"data"'),
    "above 1": (INFER, oip_request([image_tensor(ONE, data=[1.5] * 192)]), 400, "[0, 1]"),
    "binary size wrong": (INFER, oip_request([image_tensor(ONE, parameters={"binary_data_size": 4})], binary=RAW),
                          400, "binary_data_size 4"),
    "binary cut short": (INFER, oip_request([image_tensor(ONE, parameters={"binary_data_size": 768})],
                                            binary=RAW[:-4]), 400, "764 bytes"),
    "binary NaN": (INFER, oip_request([image_tensor(ONE, parameters={"binary_data_size": 768})],
                                      binary=np.full(192, np.nan, "<f4").tobytes()), 400, "NaN"),
    "header length past the body": (INFER, (b"{}", {"Inference-Header-Content-Length": "99"}), 400,
                                    "Inference-Header-Content-Length"),
    "unknown output": (INFER, oip_request([image_tensor(ONE, data=ZEROS)], outputs=[{"name": "scores"}]), 400,
                       "unknown output 'scores'"),
    "classification": (INFER, oip_request([image_tensor(ONE, data=ZEROS)],
                                          outputs=[{"name": "logits", "parameters": {"classification": 2}}]), 400,
                       "classification"),
    "batch above limit": (INFER, oip_request([image_tensor([MAX_BATCH + 1, 3, 8, 8], data=ZEROS)]), 413,
                          "--max-batch"),
}


@pytest.mark.parametrize("case", INVALID_INFER, ids=list(INVALID_INFER))
def test_invalid_infer_gets_the_protocols_error_shape(server: str, case: str) -> None:
    path, (body, headers), expected_status, words = INVALID_INFER[case]
    status, _, payload = http_request(server, "POST", path, body, {"Content-Type": "application/json", **headers})
    assert status == expected_status, payload
    assert set(payload) == {"error"} and words in payload["error"]


def test_concurrent_clients_each_get_exactly_their_own_answer(server: str, tiny_model: Path) -> None:
    """32 clients × 12 requests of 1-3 distinct random images each, binary and JSON mixed, all at once."""
    clients, requests_each = 32, 12
    before = metric_samples(server)
    session = onnxruntime.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])

    def one_client(number: int) -> list[str]:
        connection = triton.InferenceServerClient(server.removeprefix("http://"))
        mistakes = []
        try:
            for index in range(requests_each):
                batch = random_batch(1 + (number + index) % 3, seed=1000 * number + index)
                result = infer(connection, batch, binary=index % 2 == 0)
                expected = session.run(["logits"], {"image": batch})[0]
                if not np.allclose(result.as_numpy("logits"), expected, rtol=1e-6, atol=1e-6):
                    mistakes.append(f"client {number} request {index}")
        finally:
            connection.close()
        return mistakes

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        mistakes = [m for found in pool.map(one_client, range(clients)) for m in found]
    assert not mistakes, f"{len(mistakes)} requests got rows that are not theirs: {mistakes[:5]}"
    after = metric_samples(server)
    images = sum(1 + i % 3 for i in range(clients * requests_each))  # (number + index) % 3 over all pairs
    calls = after["dmat_batch_size_count"] - before["dmat_batch_size_count"]
    assert after["dmat_batch_size_sum"] - before["dmat_batch_size_sum"] == images
    assert calls < clients * requests_each / 2, f"{calls} onnxruntime calls for {clients * requests_each} requests"
    assert (after["dmat_batch_size_bucket{le=8.0}"] - before["dmat_batch_size_bucket{le=8.0}"]) == calls


def metric_samples(server: str) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus-client's own parser, keyed by name{labels}."""
    status, headers, text = http_request(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_metrics_count_requests_by_route_status_and_batch(server: str) -> None:
    ok = "dmat_http_requests_total{endpoint=/predict,method=POST,status=200}"
    refused = "dmat_http_requests_total{endpoint=/predict,method=POST,status=422}"
    latency = "dmat_http_request_duration_seconds_count{endpoint=/predict}"
    before = metric_samples(server)
    json_type = {"Content-Type": "application/json"}
    body = json.dumps({"inputs": random_batch(3, seed=9).tolist()}).encode()
    assert http_request(server, "POST", "/predict", body, json_type)[0] == 200
    assert http_request(server, "POST", "/predict", b'{"inputs": "cat"}', json_type)[0] == 422
    assert http_request(server, "GET", "/no/such/secret-path")[0] == 404
    after = metric_samples(server)
    assert after[ok] - before.get(ok, 0) == 1
    assert after[refused] - before.get(refused, 0) == 1
    assert after[latency] - before.get(latency, 0) == 2
    assert after["dmat_batch_size_sum"] - before["dmat_batch_size_sum"] == 3  # the refused request never ran
    assert after["dmat_inference_duration_seconds_count"] > before["dmat_inference_duration_seconds_count"]
    assert after["dmat_http_requests_in_flight"] == 1  # the /metrics request itself
    assert after["dmat_http_requests_total{endpoint=unmatched,method=GET,status=404}"] >= 1
    assert not any("secret-path" in key for key in after)  # raw paths never become labels
    sha256 = http_request(server, "GET", "/metadata")[2]["sha256"]
    assert after[f"dmat_model_info{{name={MODEL},sha256={sha256},version=1}}"] == 1
