"""docker-compose.yml for real, under podman-compose: PostgreSQL, the MLflow tracking server and the model server.

The README's team workflow, step by step: bring up the tracking stack, run pipeline stages on the host against
the containerized server (MLFLOW_TRACKING_URI), read what they logged back through the REST API, let `verify`
register the tiny pipeline's model as champion, start `serve` (which fetches the champion from the tracking
server by its service name), predict, and `compose down`: nothing of the project is left.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import BIN_DIR, EVERY_IMAGE, REPO_ROOT, run_dmat
from tests.containers import engine
from tests.containers.conftest import Batch
from tests.deploy.helpers import free_port, http_request, post_json
from tests.test_team_tracking import download, key_values, rest

pytestmark = [pytest.mark.containers, pytest.mark.slow]

SERVICES = ("postgres", "mlflow", "serve")
START_TIMEOUT_S = 240
CHAMPION = "models:/dmat-classifier@champion"  # what the compose file's serve service serves


@dataclass
class Stack:
    """One compose project under a unique name, configured through its own env file."""

    project: str
    env_file: Path
    mlflow_url: str
    serve_url: str

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """podman-compose on the repository's docker-compose.yml; the serve profile on, as `up -d serve` needs."""
        return engine.run([str(BIN_DIR / "podman-compose"), "-f", str(REPO_ROOT / "docker-compose.yml"),
                           "-p", self.project, "--env-file", str(self.env_file), "--profile", "serve", *args],
                          check=check, timeout=engine.BUILD_TIMEOUT_S)

    def containers(self) -> dict[str, str]:
        """{service: container name} of every container of the project, running or not."""
        listed = engine.podman("ps", "--all", "--format", "json", "--filter",
                               f"label=io.podman.compose.project={self.project}").stdout
        return {c["Labels"]["com.docker.compose.service"]: c["Names"][0] for c in json.loads(listed or "[]")}

    def logs(self) -> str:
        return "\n".join(f"--- {service}\n{engine.logs(name)}" for service, name in self.containers().items())


@pytest.fixture
def stack(base_images: dict[str, str], tracking_image: str, serve_image: str, tmp_path: Path) -> Iterator[Stack]:
    """A compose project, not started yet; taken down with its volumes whatever the test did."""
    ports = {"MLFLOW_PORT": free_port(), "SERVE_PORT": free_port()}
    settings = {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": secrets.token_hex(12), "POSTGRES_DB": "mlflow",
                **ports, **base_images, "DMAT_SHARED_DATA": str(tmp_path)}
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    stack = Stack(engine.unique_name("dmat-test"), env_file, f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
                  f"http://127.0.0.1:{ports['SERVE_PORT']}")
    try:
        yield stack
    finally:
        stack.compose("down", "--volumes", check=False)


def test_stack_tracks_host_stages_serves_the_champion_and_goes_away(stack: Stack, tiny_pipeline: Path,
                                                                     host_batch: Batch, image_archive: Path,
                                                                     tmp_path: Path) -> None:
    # The compose file's own build sections, from the same base: the images the fixtures built, from cache.
    stack.compose("build", "mlflow", "serve")
    stack.compose("up", "-d", "mlflow")
    engine.wait_for_http(f"{stack.mlflow_url}/health", START_TIMEOUT_S, stack.logs)

    check_prepare_run_is_readable_over_rest(stack.mlflow_url, tmp_path / "prepare", image_archive)
    register_champion(stack.mlflow_url, tiny_pipeline, tmp_path / "verify")

    stack.compose("up", "-d", "serve")
    engine.wait_for_http(f"{stack.serve_url}/health", START_TIMEOUT_S, stack.logs)
    status, _, metadata = http_request(stack.serve_url, "GET", "/metadata")
    assert status == 200 and metadata["source"]["uri"] == CHAMPION and metadata["classes"] == list(host_batch.classes)
    status, answer = post_json(stack.serve_url, {"inputs": host_batch.inputs.tolist()})
    assert status == 200, answer
    np.testing.assert_allclose([p["logits"] for p in answer["predictions"]], host_batch.logits, rtol=1e-5, atol=1e-5)

    containers = stack.containers()
    assert set(containers) == set(SERVICES), containers
    for service, name in containers.items():
        result = engine.healthcheck(name)
        assert result.returncode == 0, f"{service} is not healthy: {result.stdout}{result.stderr}\n{stack.logs()}"

    networks = {n for c in containers.values() for n in container_networks(c)}
    stack.compose("down", "--volumes")
    assert not stack.containers(), "compose down left containers behind"
    for network in networks:
        assert engine.podman("network", "exists", network, check=False).returncode != 0, f"network {network} left"
    volumes = engine.podman("volume", "ls", "--quiet", "--filter",
                            f"label=io.podman.compose.project={stack.project}").stdout.split()
    assert not volumes, f"compose down --volumes left {volumes}"


def check_prepare_run_is_readable_over_rest(uri: str, project: Path, image_archive: Path) -> None:
    """`dmat prepare` on the host logs params, metrics, dataset inputs and artifacts to the containerized server."""
    (project / ".dvc").mkdir(parents=True)
    (project / "params.yaml").write_text(f"data:\n  name: tiny\n  path: {image_archive}\n  val_size: 3\n{EVERY_IMAGE}")
    result = run_dmat("prepare", "--params", "params.yaml", cwd=project,
                      env={"MLFLOW_TRACKING_URI": uri, "DVC_STAGE": "prepare"})
    assert result.returncode == 0, result.stderr
    assert not (project / "mlflow.db").exists(), "logged to a local store, not to the server"
    written = json.loads((project / "reports" / "prepare.json").read_text())

    experiment = rest(uri, "mlflow/experiments/get-by-name", experiment_name="dmat")["experiment"]
    (found,) = rest(uri, "mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                 "filter": "tags.`dmat.stage` = 'prepare'"})["runs"]
    run = rest(uri, "mlflow/runs/get", run_id=found["info"]["run_id"])["run"]
    assert run["info"]["run_name"] == "prepare" and run["info"]["status"] == "FINISHED"
    assert key_values(run["data"]["params"])["data.val_size"] == "3"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["train.images"] == written["train"]["images"]
    inputs = {i["dataset"]["name"]: i["dataset"] for i in run["inputs"]["dataset_inputs"]}
    assert inputs["real/train"]["digest"] == written["train"]["sha256"][:36]
    # The artifact went through the server into the compose file's artifact volume, and comes back the same.
    assert json.loads(download(uri, run["info"]["artifact_uri"], "prepare.json")) == written
    resolved = yaml.safe_load(download(uri, run["info"]["artifact_uri"], "params.resolved.yaml"))
    assert resolved["data"]["val_size"] == 3


def register_champion(uri: str, tiny_pipeline: Path, project: Path) -> None:
    """`dmat verify` on a copy of the tiny pipeline registers its classifier under the name compose serves."""
    shutil.copytree(tiny_pipeline, project, symlinks=True)
    name = CHAMPION.removeprefix("models:/").split("@")[0]
    params = (project / "params.yaml").read_text()
    assert "registered_model: e2e-model" in params
    (project / "champion.yaml").write_text(params.replace("registered_model: e2e-model", f"registered_model: {name}"))
    result = run_dmat("verify", "--params", "champion.yaml", cwd=project, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    version = rest(uri, "mlflow/registered-models/alias", name=name, alias="champion")["model_version"]
    assert version["version"] == "1", version


def container_networks(name: str) -> list[str]:
    return list(json.loads(engine.podman("inspect", name).stdout)[0]["NetworkSettings"]["Networks"])
