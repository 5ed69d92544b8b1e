"""`dmat queue GRID --slurm`: an experiment grid as SLURM job arrays; `--status` shows how its tasks stand.

One array per variant, one task per seed (task i is the grid's i-th seed in every array), submitted with `sbatch`
in the grid's variant order. Each array waits for the one before it task by task (`--dependency=aftercorr`): the
run of seed s of a variant starts once the previous variant's run of seed s has succeeded, so the seeds run side by
side while the variants of one seed run one after another, as `dmat queue` runs them locally. The first variant
trains what a seed's runs share (its reference classifier, its diffusion model when the later variants change only
what follows it) and pushes it; the later ones take it from the DVC remote's run cache (`dvc exp run --pull`) instead
of training it again, and never train it at the same time (two such trainings leave the run cache two different
models). A task whose predecessor failed is cancelled by SLURM (`--kill-on-invalid-dep=yes`), not left pending.

Each task (`dmat.tools.slurm_task`) clones the grid's commit from the git remote into its own checkout under the
work directory, writes the profile's params.yaml, runs its variant and seed as a DVC experiment, and only after the
experiment succeeded pushes its outputs and run cache (`dvc push --run-cache`) and then the experiment
(`dvc exp push`): an experiment on the git remote always has its data on the DVC remote, and a failed or
interrupted run pushes nothing. The stages log to the tracking server (MLFLOW_TRACKING_URI), one parent run per
experiment, so `dmat compare --grid GRID` reads the results back as it does for a local grid.

Submitting is idempotent: a (variant, seed) whose experiment the git remote already has for this commit, or whose
task is still pending or running, is not submitted again; after a failure, the same command submits what is left.

Why `sbatch` and not a client library (submitit): a task is a shell-level job (git, dvc, a pipeline of processes),
not a Python function to pickle; arrays, `aftercorr` dependencies, `--requeue` and `--signal` are sbatch options
that every SLURM site documents, and the batch script this writes is one a cluster's support staff can read. It adds
no dependency to install on the login node.

Files, all under `.dmat/slurm/<grid name>/` in the submitting project (ignored by git): `jobs.json` (experiment ->
its SLURM task, log, checkout), one directory per submission with the task spec and the batch script,
`logs/<job name>_<array job>_<task>.out` (appended to across requeues), `results/<experiment>.json` (what each
task reports when it ends) and, unless `workdir` says otherwise, `runs/<experiment>/` (the tasks' checkouts).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dmat.tools.grid import Grid

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STATE_DIR = Path(".dmat/slurm")
PREVIOUS = "{previous array}"  # in an sbatch command: the job id of the array submitted before it
SLURM_TIMEOUT_S = 60
# Seconds before the time limit at which SLURM warns the task (SIGUSR1), to stop at its last checkpoint and requeue.
TIME_LIMIT_WARNING_S = 180
DEFAULT_MAX_REQUEUES = 3
MEMORY = re.compile(r"^[1-9][0-9]*[KMGT]?$")  # sbatch --mem: megabytes, or a K/M/G/T suffix
# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes or
# days-hours:minutes:seconds
TIME = re.compile(r"^(?:(?P<days>\d+)-(?P<d_hours>\d+)(?::(?P<d_minutes>\d+)(?::(?P<d_seconds>\d+))?)?"
                  r"|(?P<first>\d+)(?::(?P<second>\d+)(?::(?P<third>\d+))?)?)$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")  # partitions and accounts
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
          "SUSPENDED", "STAGE_OUT", "SIGNALING"}
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmError(ValueError):
    """Something that stops a submission before anything is submitted: names what is wrong and what to do."""


@dataclass(frozen=True)
class Resources:
    """What each task of a grid asks SLURM for (the grid file's `slurm:` block, then `dmat queue` flags)."""

    partition: str | None = None
    account: str | None = None
    cpus: int | None = None  # --cpus-per-task; also the task's OMP_NUM_THREADS
    gpus: int | None = None  # --gres=gpu:N
    mem: str | None = None  # --mem, e.g. 16G
    time: str | None = None  # --time, e.g. 4:00:00 or 1-00:00:00
    requeue: bool = True  # --requeue: preemption and node failure put the task back in the queue; it resumes
    max_requeues: int = DEFAULT_MAX_REQUEUES  # how often a task that reaches its time limit requeues itself
    workdir: str | None = None  # where the tasks' checkouts live (default: .dmat/slurm/<grid>/runs)

    def sbatch_options(self) -> list[str]:
        options = [f"--{flag}={value}" for flag, value in (("partition", self.partition), ("account", self.account),
                                                           ("cpus-per-task", self.cpus), ("mem", self.mem),
                                                           ("time", self.time)) if value is not None]
        if self.gpus:
            options.append(f"--gres=gpu:{self.gpus}")
        options.append("--requeue" if self.requeue else "--no-requeue")
        if self.requeue and self.max_requeues:
            warning = TIME_LIMIT_WARNING_S if self.time is None else min(TIME_LIMIT_WARNING_S,
                                                                          time_seconds(self.time) // 4)
            options.append(f"--signal=B:USR1@{max(warning, 10)}")
        return options


def parse_resources(raw: Any, where: str) -> Resources:
    """The `slurm:` block of a grid file, validated; ValueError naming `where`, the key and what is allowed."""
    if raw is None:
        return Resources()
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: slurm must be a mapping of {', '.join(_fields())}")
    unknown = sorted(set(raw) - set(_fields()))
    if unknown:
        raise ValueError(f"{where}: slurm.{unknown[0]} is not a setting; allowed: {', '.join(_fields())}")
    return with_changes(Resources(), raw, where)


def with_changes(resources: Resources, changes: dict[str, Any], where: str) -> Resources:
    """`resources` with `changes` (None values are left out) validated and applied."""
    checked = {}
    for key, value in changes.items():
        if value is None:
            continue
        checked[key] = _check(key, value, f"{where}: slurm.{key} = {value!r} is not allowed")
    return dataclasses.replace(resources, **checked)


def _fields() -> list[str]:
    return [f.name for f in dataclasses.fields(Resources)]


def _check(key: str, value: Any, problem: str) -> Any:
    if key in ("partition", "account"):
        if isinstance(value, str) and NAME.match(value):
            return value
        raise ValueError(f"{problem}: expected a SLURM {key} name")
    if key in ("cpus", "gpus", "max_requeues"):
        low = 1 if key == "cpus" else 0
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= 4096:
            return value
        raise ValueError(f"{problem}: expected an integer >= {low}")
    if key == "mem":
        if isinstance(value, str | int) and not isinstance(value, bool) and MEMORY.match(str(value)):
            return str(value)
        raise ValueError(f"{problem}: expected megabytes or a number with K, M, G or T (e.g. 16G)")
    if key == "time":
        if isinstance(value, str | int) and not isinstance(value, bool) and TIME.match(str(value)) \
                and time_seconds(str(value)) > 0:
            return str(value)
        raise ValueError(f"{problem}: expected a SLURM time limit: minutes, H:MM:SS or D-HH:MM:SS (e.g. 4:00:00)")
    if key == "requeue":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{problem}: expected true or false")
    if key == "workdir":
        if isinstance(value, str) and value.strip():
            return value
        raise ValueError(f"{problem}: expected a directory")
    raise ValueError(f"{problem}: unknown setting")


def time_seconds(limit: str) -> int:
    """A SLURM time limit in seconds (see TIME for the forms)."""
    match = TIME.match(limit)
    if match is None:
        raise ValueError(f"not a SLURM time limit: {limit!r}")
    part = {k: int(v) if v is not None else 0 for k, v in match.groupdict().items()}
    if match["days"] is not None:
        return part["days"] * 86400 + part["d_hours"] * 3600 + part["d_minutes"] * 60 + part["d_seconds"]
    if match["third"] is not None:
        return part["first"] * 3600 + part["second"] * 60 + part["third"]
    return part["first"] * 60 + part["second"]


# --- the command line -------------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "SLURM", "with --slurm the grid's runs become SLURM job arrays (one task per variant and seed) instead of "
                 "local queued experiments; settings override the grid file's `slurm:` block")
    group.add_argument("--slurm", action="store_true",
                       help="submit the grid with sbatch (needs a git remote with this commit, a DVC remote and "
                            "MLFLOW_TRACKING_URI pointing at a tracking server)")
    group.add_argument("--status", action="store_true", help="with --slurm: show the grid's tasks instead")
    group.add_argument("--partition", help="SLURM partition")
    group.add_argument("--account", help="SLURM account to charge")
    group.add_argument("--cpus", type=int, metavar="N", help="CPUs per task (--cpus-per-task; sets OMP_NUM_THREADS)")
    group.add_argument("--gpus", type=int, metavar="N", help="GPUs per task (--gres=gpu:N)")
    group.add_argument("--mem", help="memory per task, e.g. 16G")
    group.add_argument("--time", help="time limit per task, e.g. 4:00:00; a task requeues itself before it")
    group.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=None,
                       help="requeue tasks after preemption, node failure or their time limit; they resume from "
                            "their checkpoints (default: yes)")
    group.add_argument("--max-requeues", type=int, metavar="N",
                       help=f"time-limit requeues per task (default {DEFAULT_MAX_REQUEUES})")
    group.add_argument("--workdir", metavar="DIR",
                       help="where the tasks' checkouts live; a requeued task resumes there, so it should be storage "
                            "every node sees (default: .dmat/slurm/<grid>/runs in this project)")
    group.add_argument("--git-remote", default="origin", metavar="NAME",
                       help="git remote the tasks clone from and push experiments to (default: origin)")


def flag_changes(args: argparse.Namespace) -> dict[str, Any]:
    return {"partition": args.partition, "account": args.account, "cpus": args.cpus, "gpus": args.gpus,
            "mem": args.mem, "time": args.time, "requeue": args.requeue, "max_requeues": args.max_requeues,
            "workdir": args.workdir}


def run(args: argparse.Namespace, grid: Grid, root: Path) -> int:
    """`dmat queue GRID --slurm [--status]`."""
    try:
        resources = with_changes(grid.slurm or Resources(), flag_changes(args), "command line")
        if args.status:
            return show_status(grid, root)
        return submit(grid, resources, root, args.variant, args.git_remote, dry_run=args.dry_run)
    except (SlurmError, ValueError) as err:
        print(f"dmat queue: error: {err}", file=sys.stderr)
        return EXIT_USAGE


# --- submitting ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Remotes:
    commit: str
    git_url: str
    dvc_remote: str
    dvc_url: str
    tracking_uri: str


def submit(grid: Grid, resources: Resources, root: Path, only: list[str] | None, git_remote: str, *,
           dry_run: bool) -> int:
    if not dry_run and shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found: submit from a machine of the SLURM cluster (a login node)")
    remotes = preflight(grid, root, git_remote, check_tracking=not dry_run)
    state = root / STATE_DIR / grid.name
    jobs = _read_jobs(state)
    todo = runs_to_submit(grid, only, jobs, remotes, ask_slurm=not dry_run)
    if not todo:
        print("dmat queue: nothing to submit", file=sys.stderr)
        return EXIT_OK
    submission = state / f"submit-{dt.datetime.now():%Y%m%d-%H%M%S-%f}"
    workdir = Path(resources.workdir).expanduser().resolve() if resources.workdir else state / "runs"
    commands = [(variant, _sbatch_command(grid, variant, tasks, resources, state, submission, previous))
                for (variant, tasks), previous in zip(todo.items(), [None, *todo], strict=False)]
    if dry_run:
        print("\n".join(shlex.join(command).replace(PREVIOUS, "<previous array>") for _, command in commands))
        return EXIT_OK
    for directory in (submission, state / "logs", state / "results"):  # sbatch fails a task whose log has no folder
        directory.mkdir(parents=True, exist_ok=True)
    spec = _spec(grid, remotes, todo, state, workdir, resources.max_requeues if resources.requeue else 0)
    (submission / "spec.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    (submission / "task.sbatch").write_text(_batch_script(grid, remotes.commit, submission / "spec.json"),
                                            encoding="utf-8")
    submitted: dict[str, dict[str, Any]] = {}
    try:
        _sbatch_arrays(grid, todo, commands, remotes.commit, state, workdir, submitted)
    finally:
        _record(state, jobs, submitted)
    print(f"dmat queue: {len(submitted)} runs submitted to SLURM ({len(todo)} job arrays, commit "
          f"{remotes.commit[:12]})\n"
          f"watch them:    dmat queue {shlex.quote(str(grid.path))} --slurm --status   (or squeue --me)\n"
          f"compare them:  dmat compare --grid {shlex.quote(str(grid.path))}", file=sys.stderr)
    return EXIT_OK


def runs_to_submit(grid: Grid, only: list[str] | None, jobs: dict[str, dict[str, Any]], remotes: Remotes, *,
                   ask_slurm: bool) -> dict[str, list[tuple[int, int]]]:
    """variant -> its (array index, seed) to submit, in grid order: all but the runs the git remote has for this
    commit and those a submission of it still has pending or running (`ask_slurm`: look that up)."""
    done = experiments_on_remote(remotes.git_url, remotes.commit)
    queued = {jobs[name]["job"]: name for name in jobs if jobs[name]["commit"] == remotes.commit and name not in done}
    active = {queued[job] for job, state in slurm_states(list(queued)).items() if state in ACTIVE} \
        if queued and ask_slurm else set()
    todo = {}
    for variant in grid.variants:
        if only and variant not in only:
            continue
        tasks = [(i, seed) for i, seed in enumerate(grid.seeds)
                 if grid.experiment_name(variant, seed) not in done | active]
        if len(tasks) < len(grid.seeds):
            print(f"dmat queue: {grid.name}-{variant}: {len(grid.seeds) - len(tasks)} of {len(grid.seeds)} runs are on "
                  "the git remote already, or pending or running: not submitted again", file=sys.stderr)
        if tasks:
            todo[variant] = tasks
    return todo


def _sbatch_arrays(grid: Grid, todo: dict[str, list[tuple[int, int]]], commands: list[tuple[str, list[str]]],
                   commit: str, state: Path, workdir: Path, submitted: dict[str, dict[str, Any]]) -> None:
    """Submit the arrays in order, each naming the one before it; `submitted` gets each run as it is submitted."""
    array_job = ""
    for variant, command in commands:
        result = subprocess.run([arg.replace(PREVIOUS, array_job) for arg in command], capture_output=True, text=True,
                                timeout=SLURM_TIMEOUT_S)
        if result.returncode:
            raise SlurmError(f"sbatch failed for variant {variant!r} (exit {result.returncode}): "
                             f"{result.stderr.strip() or result.stdout.strip()}; submitted before it: "
                             f"{', '.join(submitted) or 'nothing'}")
        array_job = result.stdout.strip().split(";")[0]  # --parsable: "<job id>[;<cluster>]"
        for index, seed in todo[variant]:
            name = grid.experiment_name(variant, seed)
            submitted[name] = {"variant": variant, "seed": seed, "job": f"{array_job}_{index}", "commit": commit,
                               "log": str(state / "logs" / f"{grid.name}-{variant}_{array_job}_{index}.out"),
                               "checkout": str(workdir / name), "result": str(state / "results" / f"{name}.json"),
                               "submitted": dt.datetime.now().isoformat(timespec="seconds")}
        print(f"dmat queue: {grid.name}-{variant}: array job {array_job}, seeds "
              f"{', '.join(str(seed) for _, seed in todo[variant])}", file=sys.stderr)


def preflight(grid: Grid, root: Path, git_remote: str, *, check_tracking: bool = True) -> Remotes:
    """What the tasks need, checked before anything is submitted: a clean checkout whose commit the git remote has,
    the grid and its profile committed, a DVC remote, and a tracking server."""
    commit = _git(root, "rev-parse", "HEAD")
    changed = _git(root, "diff", "--name-only", "HEAD").splitlines()
    if changed:
        raise SlurmError(f"the tasks run commit {commit[:12]}, not this workspace, which has uncommitted changes: "
                         f"{', '.join(changed[:5])}; commit them (and push) first")
    for path in (grid.path.resolve().relative_to(root.resolve()).as_posix(), grid.profile):
        if subprocess.run(["git", "cat-file", "-e", f"HEAD:{path}"], cwd=root, capture_output=True).returncode:
            raise SlurmError(f"{path} is not committed: the tasks read the grid's commit, commit it (and push) first")
    try:
        git_url = _absolute_url(_git(root, "remote", "get-url", git_remote), root)
    except SlurmError:
        raise SlurmError(f"no git remote {git_remote!r}: add the repository every node can reach "
                         f"(git remote add {git_remote} URL; --git-remote NAME for another)") from None
    if not _on_remote(root, git_url, commit):
        raise SlurmError(f"commit {commit[:12]} is not on the git remote {git_remote!r} ({git_url}): the tasks clone "
                         f"it from there; push it first (git push {git_remote} HEAD)")
    dvc_remote, dvc_url = _dvc_remote(root)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise SlurmError("MLFLOW_TRACKING_URI must name a tracking server (http://HOST:PORT) that every node reaches: "
                         f"tasks on different nodes cannot share a local mlflow.db (it is {uri or 'not set'!r})")
    if check_tracking:
        from dmat.errors import TrackingError
        from dmat.tracking import check_reachable

        try:
            check_reachable(uri)
        except TrackingError as err:
            raise SlurmError(str(err)) from None
    return Remotes(commit=commit, git_url=git_url, dvc_remote=dvc_remote, dvc_url=dvc_url, tracking_uri=uri)


def experiments_on_remote(git_url: str, commit: str) -> set[str]:
    """Names of the DVC experiments the git remote holds for baseline `commit` (refs/exps/<sha[:2]>/<sha[2:]>/...)."""
    prefix = f"refs/exps/{commit[:2]}/{commit[2:]}/"
    result = subprocess.run(["git", "ls-remote", git_url, f"{prefix}*"], capture_output=True, text=True,
                            timeout=SLURM_TIMEOUT_S)
    if result.returncode:
        raise SlurmError(f"cannot list the git remote {git_url}: {result.stderr.strip()}")
    return {line.split("\t", 1)[1].removeprefix(prefix) for line in result.stdout.splitlines() if "\t" in line}


def _on_remote(root: Path, git_url: str, commit: str) -> bool:
    """Whether a branch or tag of the git remote contains `commit` (as far as this clone knows those commits)."""
    listed = subprocess.run(["git", "ls-remote", "--heads", "--tags", git_url], cwd=root, capture_output=True,
                            text=True, timeout=SLURM_TIMEOUT_S)
    if listed.returncode:
        raise SlurmError(f"cannot reach the git remote {git_url}: {listed.stderr.strip()}")
    for line in listed.stdout.splitlines():
        sha = line.split("\t", 1)[0]
        if subprocess.run(["git", "merge-base", "--is-ancestor", commit, sha], cwd=root,
                          capture_output=True).returncode == 0:
            return True
    return False


def _dvc_remote(root: Path) -> tuple[str, str]:
    """The default DVC remote's name and URL (a local path made absolute, as DVC resolves it)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise SlurmError("no default DVC remote: the tasks share models and data through one (e.g. "
                             "dvc remote add -d storage /shared/dmat-dvc, or s3://...); commit .dvc/config")
        return name, str(repo.config["remote"][name]["url"])


def _absolute_url(url: str, root: Path) -> str:
    """A git remote URL; a relative local path is made absolute (the tasks clone from elsewhere)."""
    if "://" in url or re.match(r"^[^/]+:", url):  # a URL, or scp-like user@host:path
        return url
    return str((root / url).resolve())


def _spec(grid: Grid, remotes: Remotes, todo: dict[str, list[tuple[int, int]]], state: Path, workdir: Path,
          max_requeues: int) -> dict[str, Any]:
    """What the tasks of one submission run (read by dmat.tools.slurm_task): array index -> experiment."""
    from dmat.tools.queue import set_args

    return {"grid": grid.name, "commit": remotes.commit, "git_url": remotes.git_url,
            "dvc_remote": remotes.dvc_remote, "dvc_url": remotes.dvc_url, "tracking_uri": remotes.tracking_uri,
            "params": grid.profile_text, "targets": list(grid.targets), "workdir": str(workdir),
            "logs": str(state / "logs"), "results": str(state / "results"), "max_requeues": max_requeues,
            "variants": {variant: {str(index): {"experiment": grid.experiment_name(variant, seed), "seed": seed,
                                                "set": [*set_args(grid.variants[variant]), "-S", f"base.seed={seed}"]}
                                   for index, seed in tasks}
                         for variant, tasks in todo.items()}}


def _sbatch_command(grid: Grid, variant: str, tasks: list[tuple[int, int]], resources: Resources, state: Path,
                    submission: Path, previous: str | None) -> list[str]:
    command = ["sbatch", "--parsable", f"--job-name={grid.name}-{variant}",
               f"--array={','.join(str(index) for index, _ in tasks)}",
               f"--output={state / 'logs' / '%x_%A_%a.out'}", "--open-mode=append", *resources.sbatch_options()]
    if previous is not None:  # the array submitted just before: its job id is known once it is submitted
        command += [f"--dependency=aftercorr:{PREVIOUS}", "--kill-on-invalid-dep=yes"]
    return [*command, str(submission / "task.sbatch"), variant]


def _batch_script(grid: Grid, commit: str, spec: Path) -> str:
    """The batch script of every array of one submission: the task runner, given its variant (the array task
    index picks the seed). `exec`, so that SLURM's warning signal before the time limit reaches the runner."""
    return (f"#!/bin/sh\n"
            f"# Written by `dmat queue {grid.path} --slurm`: one run of grid {grid.name!r} (commit {commit[:12]}) per\n"
            f"# array task, as a DVC experiment in its own checkout; see {spec.name} beside this file.\n"
            f"exec {shlex.quote(sys.executable)} -m dmat.tools.slurm_task {shlex.quote(str(spec))} \"$1\"\n")


def _read_jobs(state: Path) -> dict[str, dict[str, Any]]:
    path = state / "jobs.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _record(state: Path, jobs: dict[str, dict[str, Any]], submitted: dict[str, dict[str, Any]]) -> None:
    from dmat.files import write_json

    if submitted:
        write_json(state / "jobs.json", {**jobs, **submitted})


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    if result.returncode:
        raise SlurmError(f"git {' '.join(args)} failed in {root}: {result.stderr.strip()}")
    return result.stdout.strip()


# --- status ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskStatus:
    experiment: str
    job: str
    state: str  # SLURM's job state, or the task's own report once SLURM has forgotten the job
    detail: str  # why it waits, how it failed, where it is
    log: str


def show_status(grid: Grid, root: Path) -> int:
    """Print one line per submitted run of the grid, in grid order; exit 1 when one failed or was cancelled."""
    jobs = _read_jobs(root / STATE_DIR / grid.name)
    names = [grid.experiment_name(v, s) for v in grid.variants for s in grid.seeds]
    listed = [name for name in names if name in jobs]
    if not listed:
        print(f"dmat queue: no SLURM submission of grid {grid.name!r} in {root / STATE_DIR / grid.name}",
              file=sys.stderr)
        return EXIT_USAGE
    statuses = task_statuses({name: jobs[name] for name in listed})
    print(format_status(statuses))
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    missing = len(names) - len(listed)
    print(f"{len(listed)} runs: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
          + (f"; {missing} never submitted" if missing else ""))
    return EXIT_FAILED if any(s.state in FAILED for s in statuses) else EXIT_OK


def task_statuses(jobs: dict[str, dict[str, Any]]) -> list[TaskStatus]:
    live = slurm_details([job["job"] for job in jobs.values()])
    statuses = []
    for name, job in jobs.items():
        report = _report(job)
        found = live.get(job["job"])
        if found is None:
            state = report.get("state", "UNKNOWN").upper() if report else "UNKNOWN"
            detail = report.get("message", "SLURM no longer knows the job") if report else \
                "SLURM no longer knows the job and the task left no report"
        else:
            state, reason, elapsed, restarts, node = found
            detail = ", ".join(filter(None, [
                f"{elapsed}" if elapsed and elapsed != "0:00" and elapsed != "00:00:00" else "",
                f"on {node}" if node and node not in ("(null)", "None assigned") else "",
                f"requeued {restarts}x" if restarts not in ("", "0") else "",
                f"waits: {reason}" if state == "PENDING" and reason not in ("", "None") else "",
                f"{reason}" if state == "CANCELLED" and reason not in ("", "None") else "",
                report.get("message", "") if report and state not in ACTIVE else ""]))
        statuses.append(TaskStatus(name, job["job"], state, detail, job["log"]))
    return statuses


def format_status(statuses: list[TaskStatus]) -> str:
    rows = [("experiment", "job", "state", "detail", "log")]
    rows += [(s.experiment, s.job, s.state, s.detail, s.log if s.state not in ("PENDING",) else "") for s in statuses]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
                     for row in rows).rstrip()


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    return {job: found[0] for job, found in slurm_details(job_ids).items()}


def slurm_details(job_ids: list[str]) -> dict[str, tuple[str, str, str, str, str]]:
    """job (<array job>_<task>, or a job id) -> (state, reason, elapsed, restarts, node) for the jobs SLURM still
    knows: `scontrol show
    job` (the controller keeps finished jobs for MinJobAge), then `sacct` where accounting is enabled."""
    found: dict[str, tuple[str, str, str, str, str]] = {}
    for array_job in sorted({job.split("_")[0] for job in job_ids}) if shutil.which("scontrol") else []:
        shown = subprocess.run(["scontrol", "--oneliner", "show", "job", array_job], capture_output=True, text=True,
                               timeout=SLURM_TIMEOUT_S)
        for line in shown.stdout.splitlines() if shown.returncode == 0 else []:
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            found.update(dict.fromkeys(_names(fields), (
                fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""), fields.get("RunTime", ""),
                fields.get("Restarts", ""), fields.get("NodeList", ""))))
    missing = [job for job in job_ids if job not in found]
    if missing and shutil.which("sacct"):
        accounted = subprocess.run(["sacct", "--allocations", "--noheader", "--parsable2", "--jobs", ",".join(missing),
                                    "--format=JobID,State,Reason,Elapsed,NodeList"],
                                   capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
        for line in accounted.stdout.splitlines() if accounted.returncode == 0 else []:
            job, state, reason, elapsed, node = (line.split("|") + [""] * 5)[:5]
            found.setdefault(job, (state.split()[0] if state else "UNKNOWN", reason, elapsed, "", node))
    return found


def _names(fields: dict[str, str]) -> list[str]:
    """The names of the jobs one `scontrol show job` record stands for: `<array job>_<task>` for array tasks (a
    pending array's record lists several: "0-3,5%2"), the job id for any other job."""
    if "ArrayTaskId" not in fields:
        return [fields.get("JobId", "")]
    names = []
    for part in fields["ArrayTaskId"].split("%")[0].split(","):
        low, _, high = part.partition("-")
        names += [f"{fields['ArrayJobId']}_{i}" for i in range(int(low), int(high or low) + 1)] if low.isdigit() else []
    return names


def _report(job: dict[str, Any]) -> dict[str, Any] | None:
    """The task's own report (dmat.tools.slurm_task), when it belongs to this job."""
    try:
        report = json.loads(Path(job["result"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if report.get("job") == job["job"] else None
