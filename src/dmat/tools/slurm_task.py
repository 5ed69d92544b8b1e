"""One SLURM array task of `dmat queue GRID --slurm`: one (variant, seed) of the grid as a DVC experiment.

    python -m dmat.tools.slurm_task SPEC VARIANT     (the batch script `dmat queue --slurm` writes runs this)

SPEC (written at submission) holds the grid's commit, the git and DVC remotes, the tracking server, the profile's
params and, per variant, the experiment of each array task index. The task:

1. returns at once if the git remote has the experiment already (a requeue after it was pushed);
2. makes its checkout `<workdir>/<experiment>`: a clone of the commit (made beside it, then renamed, so a half
   clone never passes for one), or, when requeued, the checkout its previous attempt left, with the stages it
   finished and the checkpoints (`.dmat/work/<stage>`) of the one it was in;
3. writes the profile as params.yaml and runs `dvc exp run -n EXPERIMENT --pull -S ... TARGETS` there: `--pull`
   restores a stage from the DVC remote's run cache when an earlier task ran it with the same params and inputs,
   and an interrupted stage resumes from its checkpoint; the stages log to the tracking server;
4. only after the experiment succeeded: `dvc push --run-cache` (its outputs and run cache), then `dvc exp push`
   (the experiment's git ref) — so a failed or interrupted run pushes nothing, and an experiment on the git remote
   always has its data on the DVC remote — and removes the checkout.

SLURM's SIGUSR1 (`--signal=B:USR1@S`: S seconds before the time limit) stops the experiment (the stage keeps its
last checkpoint) and requeues the task (`scontrol requeue`), at most `max_requeues` times; SIGTERM (preemption,
`scancel`) stops it and leaves the requeue, if any, to SLURM. Either way the task writes a report
(`results/<experiment>.json`: state, the step that failed, exit code, log, checkout) that `dmat queue --slurm
--status` shows. Exit 0 when the experiment is on the remotes, 1 when a step failed, 143 when stopped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_STOPPED = 0, 1, 143
STOP_GRACE_S = 60  # after SIGTERM, how long the experiment may take to stop before it is killed
KILL_WAIT_S = 10  # after SIGKILL, how long its processes may take to go


class StepFailed(RuntimeError):
    def __init__(self, step: str, code: int):
        super().__init__(f"{step} failed (exit {code})")
        self.step, self.code = step, code


class Task:
    """The array task's experiment: where it runs, what it runs, and what it reports."""

    def __init__(self, spec: dict[str, Any], variant: str, index: str):
        entry = spec["variants"][variant][index]
        self.spec, self.variant = spec, variant
        self.name, self.seed, self.sets = entry["experiment"], entry["seed"], entry["set"]
        self.checkout = Path(spec["workdir"]) / self.name
        env = self.env = task_env(spec, self.checkout)
        self.job = f"{env.get('SLURM_ARRAY_JOB_ID', '?')}_{index}"
        self.log = str(Path(spec["logs"]) / f"{env.get('SLURM_JOB_NAME', '')}_{self.job}.out")
        self.restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
        self.started = time.monotonic()
        self.child: subprocess.Popen | None = None
        self.stop_reason: str | None = None
        self.requeue = False  # stopped before the time limit: requeue once the experiment has stopped

    # --- the steps ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        self.say(f"{self.name} (variant {self.variant}, seed {self.seed}) on {socket.gethostname()}, commit "
                 f"{self.spec['commit'][:12]}, attempt {self.restarts + 1}")
        try:
            if self.name in remote_experiments(self.spec["git_url"], self.spec["commit"]):
                self.report("completed", f"already on the git remote; nothing to do (attempt {self.restarts + 1})")
                return EXIT_OK
            self.prepare_checkout()
            if self.name not in local_experiments(self.checkout):
                self.write_params()
                self.step("dvc exp run", ["dvc", "exp", "run", "-n", self.name, "--pull", *self.sets,
                                          *self.spec["targets"]])
            targets = self.spec["targets"]
            self.step("dvc push", ["dvc", "push", "--run-cache", *(["--with-deps", *targets] if targets else [])])
            self.push_uncached_outputs()
            self.step("dvc exp push", ["dvc", "exp", "push", "--no-cache", "origin", self.name])
        except StepFailed as failure:
            if self.stop_reason:
                return self.stopped()
            self.report("failed", f"{failure}; log {self.log}; checkout kept at {self.checkout}", step=failure.step,
                        code=failure.code)
            self.say(f"error: {failure}; the checkout is kept at {self.checkout}")
            return EXIT_FAILED
        shutil.rmtree(self.checkout, ignore_errors=True)
        self.report("completed", f"pushed to the git and DVC remotes in {self.minutes()} (attempt {self.restarts + 1})")
        self.say(f"{self.name} is on the remotes")
        return EXIT_OK

    def prepare_checkout(self) -> None:
        if self.checkout.is_dir():
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=self.checkout, capture_output=True, text=True)
            if head.returncode == 0 and head.stdout.strip() == self.spec["commit"]:
                self.say(f"resuming in the checkout of a previous attempt: {self.checkout}")
                return
            self.say(f"{self.checkout} is not a checkout of {self.spec['commit'][:12]}: cloning again")
            shutil.rmtree(self.checkout)
        partial = self.checkout.with_name(f".{self.checkout.name}.cloning")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        self.step("git clone", ["git", "clone", "--quiet", "--no-checkout", self.spec["git_url"], str(partial)],
                  cwd=None)
        self.step("git checkout", ["git", "checkout", "--quiet", "--detach", self.spec["commit"]], cwd=partial)
        # The remote every task shares (a relative path in the committed config would resolve elsewhere here).
        self.step("dvc remote", ["dvc", "remote", "add", "--local", "--force", "--default", self.spec["dvc_remote"],
                                 self.spec["dvc_url"]], cwd=partial)
        partial.rename(self.checkout)

    def push_uncached_outputs(self) -> None:
        """Push the cached copies of the outputs declared `cache: false` (metrics, plots). DVC's run cache keeps
        such copies so that it can restore a stage, but `dvc push` sends only the outputs it caches, so another task
        restoring the stage from the remote's run cache would find them missing and run the stage again."""
        from dvc.repo import Repo

        if self.stop_reason:
            raise StepFailed("dvc push (uncached outputs)", EXIT_STOPPED)
        with Repo(str(self.checkout)) as repo:
            outs = [out for stage in repo.index.stages for out in stage.outs if not out.use_cache and out.hash_info]
            present = {out.hash_info for out in outs if out.cache.exists(out.hash_info.value)}
            result = repo.cloud.push(present)
        self.say(f"{len(result.transferred)} uncached outputs pushed for the run cache")
        if result.failed:
            self.say(f"error: {len(result.failed)} could not be pushed")
            raise StepFailed("dvc push (uncached outputs)", EXIT_FAILED)

    def write_params(self) -> None:
        """The profile's params, as `dmat queue` puts them in place locally; `-S` then sets the variant and seed."""
        from dmat.files import atomic_path

        with atomic_path(self.checkout / "params.yaml") as tmp:
            tmp.write_text(self.spec["params"], encoding="utf-8")

    def step(self, name: str, command: list[str], cwd: Path | None | str = "checkout") -> None:
        """Run one command of the task, its output in the task's log; StepFailed when it fails or is stopped."""
        if self.stop_reason:
            raise StepFailed(name, EXIT_STOPPED)
        self.say(f"$ {' '.join(command)}")
        # Its own process group, so that a stop reaches DVC and the stage it runs, and never this process twice.
        self.child = subprocess.Popen(command, cwd=self.checkout if cwd == "checkout" else cwd, env=self.env,
                                      start_new_session=True)
        code = self.child.wait()
        if self.stop_reason:
            self.wait_for_group(self.child.pid)
        self.child = None
        if code:
            raise StepFailed(name, code)

    # --- stopping ---------------------------------------------------------------------------------------------------

    def on_time_limit(self, signum: int, frame: Any) -> None:
        """SIGUSR1, S seconds before the time limit: stop at the last checkpoint and requeue (if requeues are left)."""
        if self.restarts >= self.spec["max_requeues"]:
            self.say(f"time limit near after {self.restarts} requeue(s), the most allowed: the task runs on until "
                     "SLURM stops it")
            return
        self.stop("time limit near: stopped, to be requeued", requeue=True)

    def on_terminate(self, signum: int, frame: Any) -> None:
        """SIGTERM from SLURM (preemption, scancel, the time limit itself): stop; SLURM requeues if it does."""
        self.stop(f"stopped by {signal.Signals(signum).name} (preemption, scancel or the time limit)")

    def stop(self, reason: str, requeue: bool = False) -> None:
        """Ask the running command to stop (the stage keeps its last checkpoint); kill it after STOP_GRACE_S. The
        main flow sees it fail and reports the stop."""
        if self.stop_reason:
            return
        self.stop_reason, self.requeue = reason, requeue
        self.say(reason)
        if self.child is not None:
            group = self.child.pid
            _signal_group(group, signal.SIGTERM)
            signal.signal(signal.SIGALRM, lambda *_: _signal_group(group, signal.SIGKILL))
            signal.alarm(STOP_GRACE_S)

    def wait_for_group(self, group: int) -> None:
        """Return once no process of the stopped command's group is left. DVC dies at once on SIGTERM, but the stage
        it ran ends its MLflow run and writes its checkpoint first, orphaned: a requeued attempt that started before
        it ended would resume in the same checkout beside it. The alarm set by `stop` kills what outlives the grace."""
        deadline = time.monotonic() + STOP_GRACE_S + KILL_WAIT_S
        while _group_alive(group):
            if time.monotonic() > deadline:
                self.say(f"warning: processes of group {group} outlived SIGKILL; going on without them")
                return
            time.sleep(0.2)
        signal.alarm(0)

    def stopped(self) -> int:
        self.report("interrupted", f"{self.stop_reason} after {self.minutes()}; a requeued attempt resumes in "
                                   f"{self.checkout}")
        if self.requeue:
            # Once the experiment has stopped: SLURM ends this attempt and queues the task again.
            # The array task by name: the array's own job id names every task of the array.
            requeued = subprocess.run(["scontrol", "requeue", self.job], capture_output=True, text=True)
            if requeued.returncode:
                self.say(f"error: scontrol requeue failed: {requeued.stderr.strip()}")
        return EXIT_STOPPED

    # --- reporting ----------------------------------------------------------------------------------------------

    def report(self, state: str, message: str, **extra: Any) -> None:
        from dmat.files import write_json

        write_json(Path(self.spec["results"]) / f"{self.name}.json", {
            "experiment": self.name, "job": self.job, "state": state, "message": message, "log": self.log,
            "checkout": str(self.checkout), "host": socket.gethostname(), "restarts": self.restarts,
            "seconds": round(time.monotonic() - self.started, 1),
            "finished": dt.datetime.now().isoformat(timespec="seconds"), **extra})

    def minutes(self) -> str:
        return f"{(time.monotonic() - self.started) / 60:.1f} min"

    def say(self, message: str) -> None:
        print(f"[{dt.datetime.now():%H:%M:%S}] dmat slurm task: {message}", file=sys.stderr, flush=True)


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # every process of the group has ended
        os.killpg(group, signum)


def _group_alive(group: int) -> bool:
    """Whether a process of `group` still runs. Zombies do not count: an orphan that ended waits for the container's
    init to reap it, which may never happen."""
    import psutil

    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == group:
                return True
        except (ProcessLookupError, psutil.Error):  # ended while we looked
            continue
    return False


def remote_experiments(git_url: str, commit: str) -> set[str]:
    from dmat.tools.slurm import SlurmError, experiments_on_remote

    try:
        return experiments_on_remote(git_url, commit)
    except SlurmError:
        raise StepFailed("git ls-remote", EXIT_FAILED) from None


def local_experiments(checkout: Path) -> set[str]:
    """Experiments committed in the checkout (one finished before a requeue, its push not yet done)."""
    result = subprocess.run(["git", "for-each-ref", "--format=%(refname:lstrip=4)", "refs/exps/"], cwd=checkout,
                            capture_output=True, text=True)
    return set(result.stdout.split())


def task_env(spec: dict[str, Any], checkout: Path) -> dict[str, str]:
    """The environment of the task's commands: this installation's `dvc` and `dmat` first on PATH, the commit's
    own code imported (DVC hashed src/dmat of the checkout as the stages' dependencies: that code must run), the
    tracking server, and as many threads as CPUs SLURM gave the task."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout / "src"), env.get("PYTHONPATH")]))
    env["MLFLOW_TRACKING_URI"] = spec["tracking_uri"]
    if env.get("SLURM_CPUS_PER_TASK") and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]
    for name in ("DVC_EXP_NAME", "DVC_STAGE", "DVC_ROOT"):  # never inherited from a submitting DVC stage
        env.pop(name, None)
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or "SLURM_ARRAY_TASK_ID" not in os.environ:
        print(__doc__, file=sys.stderr)
        return 2
    spec_path, variant = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    task = Task(spec, variant, os.environ["SLURM_ARRAY_TASK_ID"])
    signal.signal(signal.SIGUSR1, task.on_time_limit)
    signal.signal(signal.SIGTERM, task.on_terminate)
    return task.run()


if __name__ == "__main__":
    sys.exit(main())
