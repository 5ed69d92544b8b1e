"""`dmat queue GRID`: queue every (variant, seed) of an experiment grid as a DVC experiment.

DVC's queue snapshots the workspace's params.yaml when an experiment is queued, so for the time it
queues, this puts the grid's profile in params.yaml and passes each variant's changes and the seed as
`-S KEY=VALUE`; params.yaml is restored afterwards, whatever happens. Experiments are queued variant
by variant, each over all the seeds, in the grid's order. That keeps the queue workers off one seed at the
start: two runs of one seed starting together would both train the models they share (the seed's reference
classifier), leaving DVC's run cache two entries with different bytes; it restores the newest, so a later
run of that seed gets a reference the first variant's samples were not scored with, and samples again
instead of taking them from the cache. With at least as many seeds as workers this cannot happen. `--start N`
then starts N queue workers (`dvc queue start -j N`), and `--watch` follows the grid until every experiment has
finished: a line per change of the counts, and workers started again when DVC's workers exit with experiments
still queued (DVC's queue workers sometimes stop early: treeverse/dvc#10562). The command to read the outcomes back is
printed at the end: `dmat compare --grid GRID`.

A grid of another pipeline (its `pipeline` key) is queued the same way with that pipeline's params file
(`-S FILE:KEY=VALUE`), running its dvc.yaml; the command printed at the end is that pipeline's report.

Before queueing it creates the MLflow tracking store if there is none yet (queue workers starting together on a
new store would race on its creation). Exit 0 when everything was queued (with `--watch`: and succeeded); 1 when
the tracking store cannot be used, `dvc` failed (it names the experiments queued so far) or, with `--watch`, an
experiment failed (named); 2 for a bad grid file (nothing queued).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from dmat.tools import slurm

if TYPE_CHECKING:
    from dmat.tools.grid import Grid

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
WATCH_POLL_S = 30  # seconds between two looks at `dvc queue status` under --watch
ACTIVE, DONE = ("Running", "Queued"), ("Success", "Failed")  # `dvc queue status` states, in order of precedence


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", metavar="GRID", help="grid file, e.g. experiments/cpu-scale.yaml")
    parser.add_argument("--start", type=int, default=0, metavar="JOBS",
                        help="then start this many queue workers (`dvc queue start -j JOBS`); 0 = only queue")
    parser.add_argument("--variant", action="append", metavar="NAME",
                        help="queue only this variant (repeatable; default: all), e.g. the ones a stopped run lacks")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc commands instead of running them")
    parser.add_argument("--watch", action="store_true",
                        help="with --start: follow the grid until every experiment has finished, starting the "
                             "workers again if they stop early; exit 1 if one failed")
    slurm.configure(parser)


def run(args: argparse.Namespace) -> int:
    from dmat.files import project_root
    from dmat.tools.grid import GridError, load_grid

    if args.watch and args.start < 1:
        print("dmat queue: error: --watch follows the queue workers that --start starts: add --start N",
              file=sys.stderr)
        return EXIT_USAGE
    root = project_root()
    try:
        grid = load_grid(args.grid, root)
    except GridError as err:
        print(f"dmat queue: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    unknown = sorted(set(args.variant or []) - set(grid.variants))
    if unknown:
        print(f"dmat queue: error: {args.grid}: no variant {unknown[0]!r}; it has {', '.join(grid.variants)}",
              file=sys.stderr)
        return EXIT_USAGE
    if args.slurm:
        if args.start:
            print("dmat queue: error: --start starts local queue workers; with --slurm SLURM runs the grid",
                  file=sys.stderr)
            return EXIT_USAGE
        return slurm.run(args, grid, root)
    if args.status:
        print("dmat queue: error: --status shows a grid's SLURM tasks: add --slurm (local queue: dvc queue status)",
              file=sys.stderr)
        return EXIT_USAGE
    commands = queue_commands(grid, args.variant)
    if args.dry_run:
        print("\n".join(shlex.join(cmd) for _, cmd in commands))
        return EXIT_OK
    from dmat.errors import TrackingError
    from dmat.tracking import prepare_store

    try:  # before any queue worker can start: parallel first uses of a new store would race on its creation
        prepare_store()
    except TrackingError as err:
        print(f"dmat queue: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    queued = _queue_with_profile(root / grid.params_file, grid.profile_text, commands)
    if len(queued) < len(commands):
        print(f"dmat queue: error: `dvc exp run --queue` failed for {commands[len(queued)][0]}; queued before it: "
              f"{', '.join(queued) or 'none'}", file=sys.stderr)
        return EXIT_FAILED
    variants = len(set(args.variant)) if args.variant else len(grid.variants)
    print(f"dmat queue: {len(queued)} experiments queued ({variants} variants x {len(grid.seeds)} seeds)",
          file=sys.stderr)
    if args.start > 0:
        if not start_workers(root, args.start):
            return EXIT_FAILED
        print(f"dmat queue: started {args.start} queue worker(s)", file=sys.stderr)
    if args.watch:
        code = watch(root, queued, args.start)
        print(f"compare them:  {grid.report} {shlex.quote(str(args.grid))}", file=sys.stderr)
        return code
    print(("" if args.start else "start them:    dvc queue start\n")
          + "watch them:    dvc queue status\n"
          + f"compare them:  {grid.report} {shlex.quote(str(args.grid))}", file=sys.stderr)
    return EXIT_OK


def start_workers(root: Path, jobs: int) -> bool:
    """`dvc queue start -j JOBS`: DVC starts as many workers as it takes to have JOBS."""
    # The workers DVC starts outlive this command and inherit its standard streams: with a pipe there,
    # whoever reads our output (`| tail`, a test) would wait for them to finish. They log to DVC's files.
    started = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=root,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if started.returncode:
        print(f"dmat queue: error: `dvc queue start -j {jobs}` failed (exit {started.returncode}); the "
              "experiments stay queued: start them with `dvc queue start`", file=sys.stderr)
    return started.returncode == 0


def queue_states(root: Path, names: list[str]) -> dict[str, str]:
    """Each named experiment's state in `dvc queue status` (Queued, Running, Success, Failed; absent: not there).
    A name queued before keeps its old entries: an active entry wins, then a success."""
    listing = subprocess.run(["dvc", "queue", "status"], cwd=root, capture_output=True, text=True, check=True).stdout
    entries: dict[str, set[str]] = {}
    for line in listing.splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] in names and words[-1] in ACTIVE + DONE:
            entries.setdefault(words[1], set()).add(words[-1])
    return {name: next(state for state in ACTIVE + DONE if state in found) for name, found in entries.items()}


def watch(root: Path, names: list[str], jobs: int, poll_s: float = WATCH_POLL_S) -> int:
    """Follow the experiments until none is queued or running: a line whenever the counts change, and the workers
    started again when experiments wait while fewer than `jobs` run, twice in a row (once is a worker between two
    experiments). Exit 1 naming the experiments that failed or left the queue."""
    shown, short = "", 0
    while True:
        try:
            now = queue_states(root, names)
        except subprocess.CalledProcessError as err:  # e.g. DVC's queue database busy: the grid goes on
            print(f"dmat queue: `dvc queue status` failed (exit {err.returncode}); trying again", file=sys.stderr)
            time.sleep(poll_s)
            continue
        counts = Counter(now.values())
        line = (f"{counts['Success']}/{len(names)} succeeded, {counts['Running']} running, {counts['Queued']} queued, "
                f"{counts['Failed']} failed")
        if line != shown:
            print(f"dmat queue: {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)
            shown = line
        if not counts["Queued"] and not counts["Running"]:
            break
        short = short + 1 if counts["Queued"] and counts["Running"] < jobs else 0
        if short >= 2:
            print(f"dmat queue: fewer than {jobs} worker(s) while experiments wait: starting them again",
                  file=sys.stderr, flush=True)
            start_workers(root, jobs)
            short = 0
        time.sleep(poll_s)
    unfinished = [name for name in names if now.get(name) != "Success"]
    if unfinished:
        print(f"dmat queue: error: did not succeed: {', '.join(unfinished)} (`dvc queue logs NAME` says why)",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def queue_commands(grid: Grid, only: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """(experiment name, `dvc exp run --queue` argv) per (variant, seed), variant-major; `only`: these variants."""
    commands = []
    file = "" if grid.params_file == "params.yaml" else f"{grid.params_file}:"  # DVC's default params file
    targets = list(grid.targets)
    if grid.pipeline != "dvc.yaml":  # DVC's default pipeline: another one is named, with its stages
        targets = [f"{grid.pipeline}:{target}" for target in targets] or [grid.pipeline]
    for variant, changes in grid.variants.items():
        if only and variant not in only:
            continue
        sets = set_args(changes, file)
        for seed in grid.seeds:
            name = grid.experiment_name(variant, seed)
            commands.append((name, ["dvc", "exp", "run", "--queue", "-n", name, *sets, "-S", f"{file}base.seed={seed}",
                                    *targets]))
    return commands


def set_args(changes: dict[str, object], file: str = "") -> list[str]:
    """A variant's changes as `dvc exp run` arguments: `-S [FILE:]KEY=VALUE` each (FILE: another pipeline's)."""
    return [arg for key, value in changes.items() for arg in ("-S", f"{file}{key}={_yaml_value(value)}")]


def _queue_with_profile(params_file: Path, profile_text: str, commands: list[tuple[str, list[str]]]) -> list[str]:
    """Queue the commands (from the project root) with the profile as the params file; restore it; the names
    queued."""
    from dmat.files import atomic_path, project_root

    original = params_file.read_bytes()
    queued: list[str] = []
    try:
        with atomic_path(params_file) as tmp:
            tmp.write_text(profile_text, encoding="utf-8")
        for name, cmd in commands:
            print(f"dmat queue: {name}", file=sys.stderr)
            if subprocess.run(cmd, cwd=project_root(params_file.parent)).returncode:
                break
            queued.append(name)
    finally:
        with atomic_path(params_file) as tmp:
            tmp.write_bytes(original)
    return queued


def _yaml_value(value: object) -> str:
    """A value as `dvc exp run -S` parses it (YAML): strings as they are, the rest as JSON (valid YAML)."""
    return value if isinstance(value, str) else json.dumps(value)
