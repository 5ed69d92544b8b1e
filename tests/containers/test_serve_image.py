"""The `serve` image, built and run: the tiny pipeline's exported model mounted read-only, asked over HTTP.

Run as the README says (`--init`, port published on 127.0.0.1, model volume read-only), plus all capabilities
dropped and no-new-privileges, as docker-compose.yml runs it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.containers import engine
from tests.containers.conftest import EXPORTED_MODEL, Batch
from tests.deploy.helpers import encode_image, free_port, http_request, multipart, post_json

pytestmark = [pytest.mark.containers, pytest.mark.slow]

START_TIMEOUT_S = 120
STOP_BUDGET_S = 2.0
LOGIT_TOLERANCE = 1e-5  # the same onnxruntime version on the same CPU; only thread scheduling may differ


def run_args(image: str, model_dir: Path, port: int) -> list[str]:
    exposed = json.loads(engine.podman("image", "inspect", image).stdout)[0]["Config"]["ExposedPorts"]
    (container_port,) = [spec.split("/")[0] for spec in exposed]
    return ["--init", "--cap-drop=ALL", "--security-opt=no-new-privileges", "-p", f"127.0.0.1:{port}:{container_port}",
            "-v", f"{model_dir}:/models:ro"]


@pytest.fixture(scope="module")
def served(serve_image: str, tiny_pipeline: Path) -> Iterator[tuple[str, str]]:
    """(container name, base URL) of the serve image serving the tiny pipeline's classifier."""
    port = free_port()
    with engine.container(serve_image, *run_args(serve_image, (tiny_pipeline / EXPORTED_MODEL).parent, port)) as name:
        url = f"http://127.0.0.1:{port}"
        engine.wait_for_http(f"{url}/health", START_TIMEOUT_S, lambda: engine.logs(name))
        yield name, url


def test_health_and_metadata_describe_the_mounted_model(served: tuple[str, str], tiny_pipeline: Path,
                                                        host_batch: Batch) -> None:
    _, url = served
    assert http_request(url, "GET", "/health")[::2] == (200, {"status": "ok"})
    status, _, metadata = http_request(url, "GET", "/metadata")
    assert status == 200
    assert metadata["classes"] == list(host_batch.classes)
    assert metadata["input"]["shape"] == list(host_batch.inputs.shape[1:])
    assert metadata["sha256"] == hashlib.sha256((tiny_pipeline / EXPORTED_MODEL).read_bytes()).hexdigest()
    # The Open Inference Protocol's readiness probe (what KServe and Triton clients ask).
    ready, _, _ = http_request(url, "GET", "/v2/health/ready")
    assert ready == 200, f"/v2/health/ready answered {ready}"


def test_png_upload_and_json_batch_match_the_hosts_onnxruntime(served: tuple[str, str], host_batch: Batch) -> None:
    _, url = served
    body, content_type = multipart([("image", f"{i}.png", encode_image(image))
                                    for i, image in enumerate(host_batch.images)])
    status, _, uploaded = http_request(url, "POST", "/predict", body, {"Content-Type": content_type})
    assert status == 200, uploaded
    status, posted = post_json(url, {"inputs": host_batch.inputs.tolist()})
    assert status == 200, posted
    for answer in (uploaded, posted):
        predictions = answer["predictions"]
        assert [p["class_index"] for p in predictions] == host_batch.logits.argmax(1).tolist()
        assert [p["class_name"] for p in predictions] == [host_batch.classes[i] for i in host_batch.logits.argmax(1)]
        np.testing.assert_allclose([p["logits"] for p in predictions], host_batch.logits, rtol=LOGIT_TOLERANCE,
                                   atol=LOGIT_TOLERANCE)


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/predict", {"inputs": [[[[0.5]]]]}, 422),  # a 1×1×1 image: not the model's C×H×W
    ("POST", "/predict", {"inputs": "not an array"}, 422),
    ("GET", "/no-such-endpoint", None, 404),
])
def test_bad_requests_get_their_4xx_and_the_server_stays_up(served: tuple[str, str], method: str, path: str,
                                                             body: dict | None, status: int) -> None:
    _, url = served
    data = json.dumps(body).encode() if body is not None else None
    answered, _, payload = http_request(url, method, path, data, {"Content-Type": "application/json"})
    assert answered == status and payload["error"], payload
    assert http_request(url, "GET", "/health")[0] == 200


def test_healthcheck_runs_and_passes(served: tuple[str, str], serve_image: str) -> None:
    name, _ = served
    image = json.loads(engine.podman("image", "inspect", serve_image).stdout)[0]
    assert (image.get("Healthcheck") or {}).get("Test"), "HEALTHCHECK lost: build with --format docker"
    result = engine.healthcheck(name)
    assert result.returncode == 0, f"healthcheck: {result.stdout}{result.stderr}"


def test_runs_as_non_root_without_torch(served: tuple[str, str]) -> None:
    name, _ = served
    assert engine.podman("exec", name, "id", "-u").stdout.strip() != "0"
    result = engine.podman("exec", name, "python", "-c", "import torch", check=False)
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr, result.stderr


PLAIN_SERVE_TAG = "localhost/dmat-serve-test:plain-debian-python"
PROBE = ("import importlib.util, pathlib, sys, sysconfig; print(sys.prefix, importlib.util.find_spec('pip') is not "
         "None, pathlib.Path(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED').is_file())")


def test_it_builds_and_serves_on_a_plain_debian_python_from_a_virtual_environment(tiny_pipeline: Path) -> None:
    """A site's own Debian-based Python image: python3 marked externally managed (PEP 668), no venv, no pip. The serve
    target builds on it (pip runs only inside /opt/dmat, the image's own virtual environment) and serves the model."""
    base = engine.plain_debian_python()
    assert engine.podman("run", "--rm", base, "python3", "-c", PROBE).stdout.split() == ["/usr", "False", "True"], \
        f"{base} is not a plain, externally managed Debian Python"
    image = engine.build("serve", PLAIN_SERVE_TAG, base)
    assert engine.podman("run", "--rm", "--entrypoint", "python", image, "-c", PROBE).stdout.split()[:2] == \
        ["/opt/dmat", "True"], "the serve image's python is not its virtual environment's"
    port = free_port()
    with engine.container(image, *run_args(image, (tiny_pipeline / EXPORTED_MODEL).parent, port)) as name:
        engine.wait_for_http(f"http://127.0.0.1:{port}/health", START_TIMEOUT_S, lambda: engine.logs(name))


def test_stops_cleanly_within_two_seconds(serve_image: str, tiny_pipeline: Path) -> None:
    """`podman stop` sends SIGTERM through the init process; the server must exit 0 at once, not be killed."""
    port = free_port()
    with engine.container(serve_image, *run_args(serve_image, (tiny_pipeline / EXPORTED_MODEL).parent, port)) as name:
        engine.wait_for_http(f"http://127.0.0.1:{port}/health", START_TIMEOUT_S, lambda: engine.logs(name))
        started = time.monotonic()
        engine.podman("stop", "--time", "10", name)
        elapsed = time.monotonic() - started
        exit_code, log = json.loads(engine.podman("inspect", name).stdout)[0]["State"]["ExitCode"], engine.logs(name)
    assert elapsed < STOP_BUDGET_S, f"stopping took {elapsed:.1f} s:\n{log}"
    assert exit_code == 0, f"exit code {exit_code} after SIGTERM:\n{log}"
