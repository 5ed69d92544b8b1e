"""`dmat queue --watch`: follows a grid's experiments in a real DVC queue until they have finished, starts the
workers again when none is left while experiments wait, and names the experiments that failed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dmat.tools.queue import queue_states, watch
from tests.conftest import run_dmat
from tests.e2e.test_pipeline import GIT_ENV

# The stage fails for x = 3 (after reading params.yaml as DVC set it for the experiment).
STAGE = "import sys, yaml; x = yaml.safe_load(open('params.yaml'))['x']; open('out.txt', 'w').write(str(x)); " \
        "sys.exit(x == 3)"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("DVC_ROOT", "DVC_STAGE"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "params.yaml").write_text("x: 0\n")
    (tmp_path / "dvc.yaml").write_text(f'stages:\n  s:\n    cmd: {sys.executable} -c "{STAGE}"\n'
                                       "    params: [x]\n    outs: [out.txt]\n")
    for argv in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                 ["git", "commit", "-q", "-m", "a one-stage pipeline"]):
        subprocess.run(argv, cwd=tmp_path, check=True, stdout=subprocess.DEVNULL)
    yield tmp_path
    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=tmp_path, capture_output=True, env=os.environ)


def test_watch_starts_missing_workers_and_names_the_failed_experiment(project: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    names = [f"w-{x}" for x in (1, 2, 3)]
    for x, name in zip((1, 2, 3), names, strict=True):
        subprocess.run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"x={x}"], cwd=project, check=True,
                       stdout=subprocess.DEVNULL)
    assert queue_states(project, names) == dict.fromkeys(names, "Queued")

    # No worker was started: the watch sees experiments waiting with none running, and starts one.
    outcome: list[int] = []
    watcher = threading.Thread(target=lambda: outcome.append(watch(project, names, jobs=1, poll_s=0.5)), daemon=True)
    watcher.start()
    watcher.join(timeout=300)
    assert outcome == [1], "the watch did not see the experiments finish: no worker ran them"
    assert queue_states(project, names) == {"w-1": "Success", "w-2": "Success", "w-3": "Failed"}
    err = capsys.readouterr().err
    assert "starting them again" in err and "0/3 succeeded, 0 running, 3 queued, 0 failed" in err
    assert "2/3 succeeded, 0 running, 0 queued, 1 failed" in err and "did not succeed: w-3" in err


def test_watch_needs_workers_to_follow(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("profile: p.yaml\nseeds: [0]\nvariants: {a: {}}\n")
    result = run_dmat("queue", str(grid), "--watch", cwd=tmp_path)
    assert result.returncode == 2 and "add --start N" in result.stderr
