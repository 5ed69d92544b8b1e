"""Team tracking for real: a pipeline stage logs to an MLflow server backed by PostgreSQL; read it back over REST.

The fixture starts a throwaway PostgreSQL cluster (initdb in a temporary directory, 127.0.0.1 only) and
`mlflow server` with proxied artifacts, exactly as docker-compose.yml runs them; nothing is downloaded.
Without PostgreSQL binaries on the machine the tests are skipped, and the reason says where they looked.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import BIN_DIR, EVERY_IMAGE, REPO_ROOT, run_dmat, write_params

pytestmark = pytest.mark.slow

PG_PROGRAMS = ("initdb", "pg_ctl", "postgres")
DATABASE = "mlflow"
SERVER_START_TIMEOUT_S = 90
HTTP_TIMEOUT_S = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """Where initdb, pg_ctl and postgres live: PATH first, then Debian's /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((d for d in candidates if all((d / p).is_file() for p in PG_PROGRAMS)), None)


def postgres_account() -> dict[str, Any]:
    """subprocess arguments that run PostgreSQL as an unprivileged user: it refuses to run as root."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def compose_allowed_hosts() -> str:
    """The tracking server here admits the same Host headers as the one docker-compose.yml runs."""
    command = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["mlflow"]["command"]
    return command[command.index("--allowed-hosts") + 1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        reason = "PostgreSQL not found (initdb/pg_ctl/postgres in PATH or /usr/lib/postgresql/*/bin)"
        print(f"\nSKIP team tracking: {reason}")
        pytest.skip(reason)
    account = postgres_account()
    # Not pytest's tmp_path: it sits under a 0700 directory of the current user, unreachable for `postgres`.
    root = Path(tempfile.mkdtemp(prefix="dmat-pg-"))
    if account:
        os.chown(root, account["user"], account["group"])
    data, port = root / "data", free_port()
    try:
        # Trust authentication is safe here: the cluster listens on 127.0.0.1 only and lives for one test module.
        _pg(bin_dir, account, "initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
            "--locale=C", "--no-sync")
        _pg(bin_dir, account, "pg_ctl", "-D", str(data), "-l", str(root / "postgres.log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -F", "start")
        try:
            import psycopg

            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                 autocommit=True) as connection:
                connection.execute(f"CREATE DATABASE {DATABASE}")
            yield f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"
        finally:
            _pg(bin_dir, account, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _pg(bin_dir: Path, account: dict[str, Any], program: str, *args: str) -> None:
    result = subprocess.run([str(bin_dir / program), *args], capture_output=True, text=True, timeout=120,
                            cwd="/", **account)
    assert result.returncode == 0, f"{program} failed:\n{result.stdout}\n{result.stderr}"



@pytest.fixture(scope="module")
def tracking_server(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on PostgreSQL with proxied artifacts: (its URI, the artifact directory on disk)."""
    root = tmp_path_factory.mktemp("tracking")
    artifacts = root / "artifacts"
    with mlflow_server(postgres_url, root / "server.log", "--artifacts-destination", str(artifacts),
                       "--serve-artifacts", "--allowed-hosts", compose_allowed_hosts()) as uri:
        yield uri, artifacts


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, log: Path, *options: str) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 and a free port, healthy when this yields its URI; stopped after."""
    port = free_port()
    command = [str(BIN_DIR / "mlflow"), "server", "--backend-store-uri", backend_store_uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", *options]
    with log.open("w") as log_file:
        # Its own process group: `mlflow server` runs uvicorn as a child, and both must stop at teardown.
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"})
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(uri, server, log)
        yield uri
    finally:
        _stop(server)


def _wait_for_health(uri: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def rest(uri: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """One MLflow REST call (GET with a query, or POST with a JSON body), answered as JSON."""
    url = f"{uri}/api/2.0/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        return json.loads(response.read())


def download(uri: str, artifact_uri: str, path: str) -> bytes:
    """An artifact's bytes through the server's artifact proxy (mlflow-artifacts:/<exp>/<run>/artifacts/...)."""
    location = artifact_uri.removeprefix("mlflow-artifacts:").lstrip("/")
    url = f"{uri}/api/2.0/mlflow-artifacts/artifacts/{location}/{path}"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        return response.read()


def key_values(entries: list[dict]) -> dict[str, str]:
    return {entry["key"]: entry["value"] for entry in entries}


def test_stage_run_is_readable_through_the_rest_api(tracking_server: tuple[str, Path], tmp_path: Path,
                                                     image_archive: Path) -> None:
    uri, artifact_dir = tracking_server
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    write_params(project / "params.yaml", f"data:\n  name: tiny\n  path: {image_archive}\n  val_size: 3\n{EVERY_IMAGE}")
    result = run_dmat("prepare", "--params", "params.yaml", cwd=project,
                      env={"MLFLOW_TRACKING_URI": uri, "DVC_STAGE": "prepare"})
    assert result.returncode == 0, result.stderr
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists(), "logged locally, not remotely"
    written = json.loads((project / "reports" / "prepare.json").read_text())

    experiment = rest(uri, "mlflow/experiments/get-by-name", experiment_name="dmat")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:"), "artifacts must go through the server"
    (found,) = rest(uri, "mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                 "filter": "tags.`dmat.stage` = 'prepare'"})["runs"]
    run = rest(uri, "mlflow/runs/get", run_id=found["info"]["run_id"])["run"]
    assert run["info"]["run_name"] == "prepare" and run["info"]["status"] == "FINISHED"

    params, tags = key_values(run["data"]["params"]), key_values(run["data"]["tags"])
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert params["data.val_size"] == "3" and params["data.name"] == "tiny"
    splits = ("train", "val", "test")
    assert {n: metrics[f"{n}.images"] for n in splits} == {n: written[n]["images"] for n in splits}
    assert tags["dmat.stage"] == "prepare" and tags["dvc.stage"] == "prepare"
    assert tags["dmat.output.train.sha256"] == written["train"]["sha256"]

    inputs = {i["dataset"]["name"]: i for i in run["inputs"]["dataset_inputs"]}
    assert {"real/train", "real/val", "real/test", "source/tiny"} <= inputs.keys()
    train_input = inputs["real/train"]
    assert train_input["dataset"]["digest"] == written["train"]["sha256"][:36]
    assert key_values(train_input["tags"])["dmat.sha256"] == written["train"]["sha256"]

    listed = rest(uri, "mlflow/artifacts/list", run_id=run["info"]["run_id"])
    assert {"params.resolved.yaml", "prepare.json"} <= {f["path"] for f in listed.get("files", [])}
    resolved = yaml.safe_load(download(uri, run["info"]["artifact_uri"], "params.resolved.yaml"))
    assert resolved["data"]["val_size"] == 3 and resolved["data"]["path"] == str(image_archive)
    assert json.loads(download(uri, run["info"]["artifact_uri"], "prepare.json")) == written
    # The bytes live in the server's artifact store, where the compose file puts its volume.
    assert list(artifact_dir.rglob("params.resolved.yaml")), f"no artifact under {artifact_dir}"


@pytest.mark.parametrize(("host", "status"), [("mlflow:5000", 200), ("attacker.example:5000", 403)])
def test_compose_allowed_hosts_admit_the_service_name_only(tracking_server: tuple[str, Path], host: str,
                                                           status: int) -> None:
    """Inside compose, clients call http://mlflow:5000; MLflow's DNS-rebinding guard must let exactly that in."""
    uri, _ = tracking_server
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            answered = response.status
    except urllib.error.HTTPError as err:
        answered = err.code
    assert answered == status, f"Host: {host} answered {answered}, expected {status}"
