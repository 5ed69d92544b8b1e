"""A grid on a real SLURM: `dmat queue GRID --slurm` submits 2 variants x 2 seeds of the tiny pipeline (up to
evaluate@linf) through `sbatch`; the tasks clone the grid's commit from a bare git remote, share models and data
through a local-directory DVC remote and log to an MLflow server. While they run, one task is preempted
(`scontrol requeue`: SLURM stops it and queues it again) and another gets the warning SLURM sends before a time
limit (SIGUSR1 to the batch script: it stops at its checkpoint and requeues itself), both in train_diffusion after its
first checkpoint; both must resume there, and the preempted seed's diffusion model must equal an uninterrupted
training's bit for bit. A third, broken grid shows what a failed task reports and that it pushes nothing.

What these add to the local grid tests: the cluster path (arrays, the per-seed dependency chain, checkouts on
"nodes", run-cache sharing through a remote, requeue and resume), which no local run exercises.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dmat.config import read_yaml, to_yaml
from tests.conftest import BIN_DIR, run_dmat
from tests.e2e.test_pipeline import project_copy, run
from tests.slurm.conftest import ClusterProject, cluster_project, experiments_on, wait_for_jobs
from tests.test_team_tracking import key_values, rest

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.slurm]

DVC, DMAT = str(BIN_DIR / "dvc"), str(BIN_DIR / "dmat")
PROFILE = "profiles/slurm.yaml"
GRID = f"""profile: {PROFILE}
name: sl
seeds: [1, 2]
baseline: generated
targets: [evaluate@linf]
slurm: {{cpus: 1, time: "30:00"}}
variants:
  generated: {{}}
  real-only: {{mix.synthetic_fraction: 0}}
"""
# A run that fails at its first stage: the data it names does not exist.
BROKEN = f"""profile: {PROFILE}
name: broken
seeds: [1]
targets: [prepare]
variants:
  missing-data: {{data.path: /nonexistent/cifar10.tar.gz}}
"""
EXPERIMENTS = [f"sl-{variant}-s{seed}" for variant in ("generated", "real-only") for seed in (1, 2)]
PREEMPTED, WARNED = "sl-generated-s1", "sl-generated-s2"  # interrupted in train_diffusion, in two ways
TIMEOUT_S = 1800


def profile(pipeline: Path) -> str:
    """The tiny pipeline's params, with what makes an interrupted training comparable to an uninterrupted one:
    precision pinned (no probe that could choose otherwise), no label dropout (it draws from torch's global RNG, which
    a resumed process does not restore), and enough checkpointed diffusion steps to be interrupted in between."""
    params = read_yaml((pipeline / "params.yaml").read_text())
    params["base"].update(profile=PROFILE, precision="fp32", memory_format="contiguous")
    params["train_diffusion"].update(steps=12, checkpoint_every=2, label_dropout=0.0)
    params["generate"]["guidance"] = 1  # guidance needs label dropout
    params["evaluate"]["attacks"] = ["apgd-ce"]
    return to_yaml(params)


@dataclass(frozen=True)
class GridRun:
    project: ClusterProject
    tracking: str
    submitted: str  # what `dmat queue --slurm` printed
    seconds: float  # from submission until SLURM ran none of the grid's tasks


@pytest.fixture(scope="module")
def grid_run(slurm: None, tiny_pipeline: Path, tracking_server: str,
             tmp_path_factory: pytest.TempPathFactory) -> GridRun:
    project = cluster_project(tiny_pipeline, tmp_path_factory.mktemp("slurm-grid"),
                              {PROFILE: profile(tiny_pipeline), "grid.yaml": GRID, "broken.yaml": BROKEN})
    env = {"MLFLOW_TRACKING_URI": tracking_server}
    run([DMAT, "queue", "broken.yaml", "--slurm"], project.path, env=env)
    started = time.monotonic()
    submitted = run([DMAT, "queue", "grid.yaml", "--slurm"], project.path, env=env).stderr
    jobs = project.jobs("sl")
    interrupted: dict[str, str] = {}

    def interrupt_in_train_diffusion() -> None:
        for name, command in ((PREEMPTED, ["scontrol", "requeue"]), (WARNED, ["scancel", "--signal=USR1", "--batch"])):
            checkpoint = Path(jobs[name]["checkout"]) / ".dmat/work/train_diffusion/checkpoint.pt"
            if name not in interrupted and checkpoint.exists():
                run([*command, jobs[name]["job"]], project.path)
                interrupted[name] = jobs[name]["job"]

    wait_for_jobs([job["job"] for job in jobs.values()], TIMEOUT_S, interrupt_in_train_diffusion)
    seconds = time.monotonic() - started
    assert set(interrupted) == {PREEMPTED, WARNED}, \
        f"train_diffusion finished before it could be interrupted in {set(jobs) - set(interrupted)}: raise its steps"
    wait_for_jobs([job["job"] for job in project.jobs("broken").values()], TIMEOUT_S)
    return GridRun(project, tracking_server, submitted, seconds)


def status(grid: GridRun, name: str = "grid.yaml") -> subprocess.CompletedProcess:
    return subprocess.run([DMAT, "queue", name, "--slurm", "--status"], cwd=grid.project.path, capture_output=True,
                          text=True, timeout=120)


def log_of(grid: GridRun, experiment: str) -> str:
    return Path(grid.project.jobs("sl")[experiment]["log"]).read_text()


def pipeline_runs(grid: GridRun) -> dict[str, list[dict]]:
    """The MLflow parent runs of the grid's experiment, by DVC experiment name."""
    experiment = rest(grid.tracking, "mlflow/experiments/get-by-name", experiment_name="e2e")["experiment"]
    found = rest(grid.tracking, "mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                       "filter": "tags.`dmat.role` = 'pipeline'", "max_results": 100})
    parents: dict[str, list[dict]] = {}
    for parent in found.get("runs", []):
        parents.setdefault(key_values(parent["data"]["tags"])["dvc.exp_name"], []).append(parent)
    return parents


def stage_runs(grid: GridRun, stage: str) -> list[dict]:
    experiment = rest(grid.tracking, "mlflow/experiments/get-by-name", experiment_name="e2e")["experiment"]
    return rest(grid.tracking, "mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                      "filter": f"tags.`dmat.stage` = '{stage}'",
                                                      "max_results": 100}).get("runs", [])


def experiment_checkout(grid: GridRun, name: str, targets: list[str], dest: Path) -> Path:
    """A fresh clone of the git remote at experiment `name`, with `targets` and what they depend on checked out
    from the DVC remote: what a teammate gets. (The other stages' entries in its dvc.lock are the baseline
    commit's, whose outputs nobody pushed.)"""
    clone = dest / "clone"
    run(["git", "clone", "-q", "--branch", "main", str(grid.project.git_remote), str(clone)], dest)
    run([DVC, "exp", "pull", "--no-cache", "origin", name], clone)
    ref = run(["git", "for-each-ref", "--format=%(refname)", f"refs/exps/*/*/{name}"], clone).stdout.strip()
    run(["git", "checkout", "-q", "--detach", ref], clone)
    run([DVC, "pull", "--with-deps", *targets], clone)
    return clone


def test_every_run_of_the_grid_is_pushed_to_the_git_and_dvc_remotes(grid_run: GridRun, tmp_path: Path) -> None:
    assert "2 job arrays" in grid_run.submitted and "4 runs submitted to SLURM" in grid_run.submitted
    shown = status(grid_run)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert [line.split()[2] for line in shown.stdout.splitlines()[1:5]] == ["COMPLETED"] * 4, shown.stdout
    assert experiments_on(grid_run.project.git_remote) == set(EXPERIMENTS)
    assert any((grid_run.project.dvc_remote / "runs").rglob("*")), "no run cache on the DVC remote"
    for name in EXPERIMENTS:  # a finished task leaves no checkout behind
        assert not Path(grid_run.project.jobs("sl")[name]["checkout"]).exists(), name
    # What the remotes hold is the whole experiment: a clone gets its models and its numbers.
    clone = experiment_checkout(grid_run, "sl-real-only-s2", ["evaluate@linf"], tmp_path)
    assert (clone / "models/classifier/best.pt").is_file() and (clone / "data/synthetic/images.npy").is_file()
    evaluated = json.loads((clone / "metrics/evaluate_linf.json").read_text())
    (parent,) = pipeline_runs(grid_run)["sl-real-only-s2"]
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["evaluate_linf.robust_acc"] == pytest.approx(evaluated["linf_robust_acc"])


def test_one_mlflow_parent_per_run_and_compare_reads_the_grid_back(grid_run: GridRun, tmp_path: Path) -> None:
    parents = pipeline_runs(grid_run)
    assert {name: len(runs) for name, runs in parents.items()} == {name: 1 for name in EXPERIMENTS}
    assert {name: runs[0]["info"]["status"] for name, runs in parents.items()} == dict.fromkeys(EXPERIMENTS,
                                                                                                "FINISHED")
    result = run([DMAT, "compare", "--grid", "grid.yaml", "--out", str(tmp_path / "compare")], grid_run.project.path,
                 env={"MLFLOW_TRACKING_URI": grid_run.tracking})
    rows = [line for line in result.stdout.splitlines() if line.startswith("| **")]
    assert rows[0].startswith("| **generated** `baseline` | 1,2 |"), result.stdout
    assert rows[1].startswith("| **real-only** `mix.synthetic_fraction=0.0` | 1,2 |"), result.stdout


def test_later_variants_take_the_shared_stages_from_the_remote_run_cache(grid_run: GridRun) -> None:
    """real-only differs from generated only from the mix on: its seed's reference classifier, diffusion model and
    samples come from the DVC remote (pushed by generated's task of that seed, which ran first), not trained again."""
    for seed in (1, 2):
        log = log_of(grid_run, f"sl-real-only-s{seed}")
        for stage in ("prepare", "train_reference", "train_diffusion", "generate"):
            assert f"Stage '{stage}' is cached - skipping run" in log, (seed, stage)
        assert "Running stage 'train'" in log
    trained = [r["info"]["run_name"] for r in stage_runs(grid_run, "train_diffusion")]
    assert sorted(trained) == ["train_diffusion@sl-generated-s1", "train_diffusion@sl-generated-s2"]


def test_a_preempted_task_and_one_at_its_time_limit_resume_from_their_checkpoints(grid_run: GridRun) -> None:
    for name in (PREEMPTED, WARNED):
        report = json.loads(Path(grid_run.project.jobs("sl")[name]["result"]).read_text())
        assert report["state"] == "completed" and report["restarts"] == 1, report
        log = log_of(grid_run, name)
        assert "resuming in the checkout of a previous attempt" in log
        assert log.count("Running stage 'prepare'") == 1, "the stages finished before the stop ran again"
    assert "stopped by SIGTERM" in log_of(grid_run, PREEMPTED)
    assert "time limit near: stopped, to be requeued" in log_of(grid_run, WARNED)
    # The MLflow run of the interrupted stage goes on where it stopped: one run per experiment, finished.
    runs = {r["info"]["run_name"]: r["info"]["status"] for r in stage_runs(grid_run, "train_diffusion")}
    assert runs == {f"train_diffusion@{PREEMPTED}": "FINISHED", f"train_diffusion@{WARNED}": "FINISHED"}


def test_the_resumed_diffusion_model_equals_an_uninterrupted_training(grid_run: GridRun, tiny_pipeline: Path,
                                                                      tmp_path: Path) -> None:
    resumed = experiment_checkout(grid_run, PREEMPTED, ["train_diffusion"], tmp_path) / "models/diffusion/checkpoint.pt"
    # The same params and data (seed 1: the tiny pipeline's own split), trained in one go, with the task's one thread.
    reference = project_copy(tiny_pipeline, tmp_path / "reference")
    (reference / "params.yaml").write_text((grid_run.project.path / PROFILE).read_text())
    result = run_dmat("train-diffusion", cwd=reference, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    uninterrupted = torch.load(reference / "models/diffusion/checkpoint.pt", weights_only=True)
    interrupted = torch.load(resumed, weights_only=True)
    assert interrupted["step"] == uninterrupted["step"] == 12
    for weights in ("model", "ema"):
        for name, tensor in uninterrupted[weights].items():
            assert torch.equal(interrupted[weights][name], tensor), f"{weights}.{name} differs"


def test_a_failed_task_is_reported_with_its_log_and_pushes_nothing(grid_run: GridRun) -> None:
    shown = status(grid_run, "broken.yaml")
    assert shown.returncode == 1  # a failed task fails the status
    (job,) = grid_run.project.jobs("broken").values()
    line = shown.stdout.splitlines()[1]
    assert line.split()[:3] == ["broken-missing-data-s1", job["job"], "FAILED"] and job["log"] in line
    report = json.loads(Path(job["result"]).read_text())
    assert report["state"] == "failed" and report["step"] == "dvc exp run" and job["log"] in report["message"]
    assert "/nonexistent/cifar10.tar.gz" in Path(job["log"]).read_text()  # the log says what went wrong
    assert Path(job["checkout"]).is_dir(), "a failed task keeps its checkout to look into"
    assert "broken-missing-data-s1" not in experiments_on(grid_run.project.git_remote)


def test_submitting_the_grid_again_submits_nothing(grid_run: GridRun) -> None:
    again = run([DMAT, "queue", "grid.yaml", "--slurm"], grid_run.project.path,
                env={"MLFLOW_TRACKING_URI": grid_run.tracking})
    assert "nothing to submit" in again.stderr
    print(f"\nSLURM grid: 4 runs in {grid_run.seconds:.0f} s from submission")
