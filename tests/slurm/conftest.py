"""The SLURM tests' cluster, remotes and tracking server: what a team's cluster has, on one machine.

A SLURM cluster must answer here (`sinfo`): CI starts a single-node one (.ci/start-slurm.sh, run by .ci/run); without
one the tests skip with the reason, except under CI=true, where they fail. Each test project is a copy of the
session's tiny pipeline, committed and pushed to a bare git repository in a temporary folder, with a local-directory
DVC remote beside it and a real `mlflow server` for the tasks to log to: the tasks clone from the one, share models
and data through the other and report to the third, as they would on a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from dmat.tools.slurm import ACTIVE, slurm_states
from tests.conftest import BIN_DIR
from tests.e2e.test_pipeline import project_copy, run
from tests.test_team_tracking import mlflow_server

START_SCRIPT = ".ci/start-slurm.sh"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer's machine; fail in CI, where a skipped SLURM test would pass unseen."""
    if in_ci():
        pytest.fail(f"{reason}. CI must run the SLURM tests: .ci/run starts a single-node cluster ({START_SCRIPT})",
                    pytrace=False)
    pytest.skip(f"{reason} (start a single-node cluster with {START_SCRIPT}, as root)")


@pytest.fixture(scope="session")
def slurm() -> None:
    """A SLURM cluster that answers, with a node ready to run jobs."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        unavailable("SLURM's client commands (sbatch, sinfo) are not installed")
    answer = subprocess.run(["sinfo", "--noheader", "--responding", "--format=%T"], capture_output=True, text=True,
                            timeout=60)
    if answer.returncode or not {"idle", "mixed", "allocated"} & set(answer.stdout.split()):
        unavailable(f"no SLURM node answers: sinfo says {(answer.stdout + answer.stderr).strip()!r}")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite store, proxied artifacts) on 127.0.0.1: the team's tracking server."""
    root = tmp_path_factory.mktemp("slurm-tracking")
    with mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "server.log", "--artifacts-destination",
                       str(root / "artifacts")) as uri:
        yield uri


@dataclass(frozen=True)
class ClusterProject:
    path: Path  # the submitting checkout
    git_remote: Path  # bare repository the tasks clone from and push experiments to
    dvc_remote: Path  # the tasks' shared DVC remote

    def state(self, grid: str) -> Path:
        return self.path / ".dmat/slurm" / grid

    def jobs(self, grid: str) -> dict[str, dict]:
        return json.loads((self.state(grid) / "jobs.json").read_text())


def cluster_project(pipeline: Path, base: Path, files: dict[str, str]) -> ClusterProject:
    """A copy of `pipeline` with `files` (a profile, grid files) committed, a bare git remote holding it and a
    DVC remote, both in `base`."""
    project = project_copy(pipeline, base)
    git_remote, dvc_remote = base / "remote.git", base / "dvc-store"
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    run([str(BIN_DIR / "dvc"), "remote", "add", "--default", "storage", str(dvc_remote)], project)
    # Everything the tiny pipeline's repro changed (dvc.lock, metrics) too: the tasks run a clean commit.
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "cluster grid"], project)
    run(["git", "init", "-q", "--bare", str(git_remote)], base)
    run(["git", "remote", "add", "origin", str(git_remote)], project)
    run(["git", "push", "-q", "origin", "HEAD:main"], project)
    return ClusterProject(project, git_remote, dvc_remote)


def wait_for_jobs(jobs: list[str], timeout: float, on_poll: Callable[[], None] = lambda: None) -> float:
    """Until SLURM runs none of `jobs` any more (each `<array job>_<task>`); calls `on_poll` in between. Seconds."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        on_poll()
        if not any(state in ACTIVE for state in slurm_states(jobs).values()):
            return time.monotonic() - started
        time.sleep(0.25)
    states = subprocess.run(["squeue", "--array"], capture_output=True, text=True).stdout
    raise AssertionError(f"SLURM jobs {jobs} still running after {timeout:.0f} s:\n{states}")


def experiments_on(git_remote: Path) -> set[str]:
    """Names of the DVC experiments the git remote holds (refs/exps/<baseline>/<name>)."""
    listed = run(["git", "ls-remote", str(git_remote), "refs/exps/*"], git_remote).stdout
    return {line.rsplit("/", 1)[-1] for line in listed.splitlines()}

