"""`dmat queue GRID --slurm` without a cluster: the grid's `slurm:` block, the sbatch commands a dry run prints, and
what a submission refuses (and says) before it submits anything. tests/slurm/ runs grids on a real SLURM."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dmat.tools.grid import GridError, load_grid
from dmat.tools.slurm import Resources, parse_resources, time_seconds
from tests.conftest import BIN_DIR
from tests.tools.test_grid import grid_file

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost"}
TRACKING = "http://127.0.0.1:5000"
GRID = "name: t\nvariants:\n  a: {}\n  b: {mix.synthetic_fraction: 0}\nslurm: {cpus: 2, time: '1:00:00'}\n"


def test_the_slurm_block_sets_what_each_task_asks_for(tmp_path: Path) -> None:
    grid = load_grid(grid_file(tmp_path, GRID), tmp_path)
    assert grid.slurm == Resources(cpus=2, time="1:00:00")
    options = grid.slurm.sbatch_options()
    assert options[:2] == ["--cpus-per-task=2", "--time=1:00:00"]
    # requeued after preemption; warned 180 s before the time limit, to stop at a checkpoint and requeue itself
    assert options[2:] == ["--requeue", "--signal=B:USR1@180"]
    assert Resources(gpus=1, requeue=False).sbatch_options() == ["--gres=gpu:1", "--no-requeue"]
    assert Resources(time="8").sbatch_options()[-1] == "--signal=B:USR1@120"  # a quarter of a short limit


@pytest.mark.parametrize(("block", "message"), [
    ("{cpu: 2}", "slurm.cpu is not a setting"),
    ("{cpus: 0}", "slurm.cpus = 0 is not allowed: expected an integer >= 1"),
    ("{gpus: two}", "slurm.gpus = 'two' is not allowed"),
    ("{mem: 16GB}", "slurm.mem = '16GB' is not allowed: expected megabytes or a number with K, M, G or T"),
    ("{time: '1h'}", "slurm.time = '1h' is not allowed: expected a SLURM time limit"),
    ("{time: 0}", "slurm.time = 0 is not allowed"),
    ("{requeue: 'yes'}", "slurm.requeue = 'yes' is not allowed: expected true or false"),
    ("{partition: 'gpu a100'}", "slurm.partition = 'gpu a100' is not allowed"),
    ("[gpu]", "slurm must be a mapping"),
])
def test_a_bad_slurm_block_is_refused_naming_the_setting(tmp_path: Path, block: str, message: str) -> None:
    with pytest.raises(GridError, match=message.replace("(", r"\(")):
        load_grid(grid_file(tmp_path, f"variants:\n  a: {{}}\nslurm: {block}\n"), tmp_path)


@pytest.mark.parametrize(("limit", "seconds"), [("30", 1800), ("30:15", 1815), ("4:00:00", 14400), ("1-0", 86400),
                                                ("1-2:30", 95400), ("2-00:00:10", 172810)])
def test_slurm_time_limits_in_every_form_sbatch_takes(limit: str, seconds: int) -> None:
    assert time_seconds(limit) == seconds
    assert parse_resources({"time": limit}, "g").time == limit


# --- a submission's checks, on a real git repository, DVC project and git remote -------------------------------------

def git(project: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, env={**os.environ, **GIT_ENV},
                            check=True)
    return result.stdout


def queue(project: Path, *args: str, tracking: str | None = TRACKING) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env['PATH']}"
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
    return subprocess.run([str(BIN_DIR / "dmat"), "queue", "grid.yaml", "--slurm", *args], cwd=project,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A DVC project with a grid, committed and pushed to a bare git remote, with a DVC remote."""
    project = tmp_path / "project"
    project.mkdir()
    grid_file(project, GRID)
    git(project, "init", "-q")
    subprocess.run([str(BIN_DIR / "dvc"), "init", "-q"], cwd=project, check=True)
    subprocess.run([str(BIN_DIR / "dvc"), "remote", "add", "-d", "storage", "../dvc-store"], cwd=project, check=True)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "grid")
    git(tmp_path, "init", "-q", "--bare", "remote.git")
    git(project, "remote", "add", "origin", "../remote.git")
    git(project, "push", "-q", "origin", "HEAD:main")
    return project


def test_a_dry_run_prints_one_array_per_variant_each_waiting_for_the_one_before(project: Path) -> None:
    result = queue(project, "--dry-run", "--partition", "gpu", "--gpus", "1")
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    for line, variant in ((first, "a"), (second, "b")):
        assert line.startswith(f"sbatch --parsable --job-name=t-{variant} --array=0,1 ")  # one task per seed
        # the grid's slurm block, and the flags on top of it
        assert {"--cpus-per-task=2", "--time=1:00:00", "--partition=gpu", "--gres=gpu:1", "--requeue"} <= set(
            line.split())
        assert line.endswith(f"task.sbatch {variant}")
    assert "--dependency" not in first
    # seed i of b starts once seed i of a has succeeded; the rest of a failed seed's chain is cancelled
    assert "--dependency=aftercorr:<previous array>' --kill-on-invalid-dep=yes" in second
    assert not (project / ".dmat").exists(), "a dry run writes nothing"


def test_flags_override_the_grid_file_and_are_checked_the_same_way(project: Path) -> None:
    result = queue(project, "--dry-run", "--time", "2-00:00:00", "--no-requeue")
    assert result.returncode == 0, result.stderr
    assert "--time=2-00:00:00" in result.stdout and "--no-requeue" in result.stdout and "USR1" not in result.stdout
    result = queue(project, "--dry-run", "--mem", "lots")
    assert result.returncode == 2 and "command line: slurm.mem = 'lots' is not allowed" in result.stderr


@pytest.mark.parametrize(("change", "message"), [
    ("dirty", "uncommitted changes: grid.yaml; commit them (and push) first"),
    ("unpushed", "is not on the git remote 'origin'"),
    ("no remote", "no git remote 'origin'"),
    ("no dvc remote", "no default DVC remote"),
    ("local tracking", "MLFLOW_TRACKING_URI must name a tracking server"),
])
def test_a_submission_the_tasks_could_not_run_is_refused_before_anything_is_submitted(
        project: Path, change: str, message: str) -> None:
    tracking: str | None = TRACKING
    if change == "dirty":
        (project / "grid.yaml").write_text((project / "grid.yaml").read_text() + "# edited\n")
    elif change == "unpushed":
        git(project, "commit", "-q", "--allow-empty", "-m", "not pushed")
    elif change == "no remote":
        git(project, "remote", "remove", "origin")
    elif change == "no dvc remote":
        subprocess.run([str(BIN_DIR / "dvc"), "remote", "default", "--unset"], cwd=project, check=True)
        git(project, "commit", "-q", "-am", "no DVC remote")
        git(project, "push", "-q", "origin", "HEAD:main")
    else:
        tracking = f"sqlite:///{project}/mlflow.db"
    result = queue(project, "--dry-run", tracking=tracking)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not result.stdout and not (project / ".dmat").exists()


def test_status_without_a_submission_says_so(project: Path) -> None:
    result = queue(project, "--status")
    assert result.returncode == 2 and "no SLURM submission of grid 't'" in result.stderr
