"""Which pipeline execution, and which variant, a stage run belongs to.

A *variant* is what a run's params change with respect to the committed `params.yaml` (HEAD) — or to
the committed profile that `base.profile` names, for an experiment that starts from one — the
seed excluded: runs of one variant over several seeds carry the same label, so they group together.
A *pipeline execution* is one `dvc exp run` (its DVC experiment name) or one `dvc repro` of a commit
with given params: every stage run of it becomes a child of one MLflow parent run, so the UI shows one
row per pipeline outcome.

The parent also reports the stages DVC did not run for the execution: a stage whose outputs are up to date
with this execution's params and inputs (restored from DVC's run cache, or already current) is *reused*, and
its headline numbers (`metrics/<stage>.json`, written when it ran) belong to the execution as well. DVC
unlocks the repository while a stage's command runs, so a stage can ask DVC which stages are current.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmat.artifacts import layout
from dmat.config import Params, ParamsError, as_dict, flatten, parse_params, read_yaml

SEED_KEY = "base.seed"
PROFILE_KEY = "base.profile"
BASELINE = "baseline"  # the variant label of runs with the committed params
UNKNOWN = "unknown"  # no committed params.yaml to compare with (not a git checkout, or no HEAD)
MAX_LABEL = 4000  # MLflow tag values hold up to 8000 characters


@dataclass(frozen=True)
class Execution:
    key: str  # identifies the pipeline execution (the parent run's `dmat.pipeline` tag)
    name: str  # the parent run's name: the DVC experiment, or repro@<commit>
    variant: str  # "baseline", "key=value key=value" (sorted), or "unknown"
    seed: int
    commit: str
    params: dict[str, Any] = field(default_factory=dict)  # the variant's params, the seed and the profile



def git_commit(root: Path) -> str:
    out = _git(root, "rev-parse", "HEAD")
    return out.strip() if out is not None else "unknown"


def committed_params(root: Path, path: str = "params.yaml", schema: type = Params) -> dict[str, Any] | None:
    """params.yaml, or the params a profile makes, at HEAD, resolved (defaults filled in) and flattened; None when
    there is none or it is invalid. Another pipeline's params file (its `schema` is not `Params`) is complete, read
    as it is."""
    from dmat.profiles import load_profile

    text = _git(root, "show", f"HEAD:{path}")
    if text is None:
        return None
    try:
        if schema is not Params:
            params = parse_params(read_yaml(text), schema)
        else:
            params = parse_params(read_yaml(text)) if path == "params.yaml" else load_profile(path, text=text)[0]
    except (ValueError, ParamsError):
        return None
    return flatten(as_dict(params))


def variant_changes(params: Any, committed: dict[str, Any]) -> dict[str, Any]:
    """The params (flattened) whose values differ from the committed ones, the seed excluded."""
    return {key: value for key, value in flatten(as_dict(params)).items()
            if key != SEED_KEY and committed.get(key) != value}


def variant_label(params: Any, committed: dict[str, Any] | None) -> str:
    """The params that differ from the committed ones (seed excluded), as a sorted `key=value` list."""
    if committed is None:
        return UNKNOWN
    changed = sorted(f"{key}={json.dumps(value)}" for key, value in variant_changes(params, committed).items())
    label = " ".join(changed) or BASELINE
    return label if len(label) <= MAX_LABEL else label[:MAX_LABEL - 3] + "..."


def current_execution(params: Any, root: Path) -> Execution:
    """The execution a stage started now belongs to: DVC's experiment (DVC_EXP_NAME, on its baseline commit) when
    under `dvc exp run`, else the commit together with a digest of the whole resolved params."""
    commit = git_commit(root)
    experiment = os.environ.get("DVC_EXP_NAME", "")
    if experiment:
        # DVC names an experiment uniquely only per baseline commit (refs/exps/<baseline>/<name>): the same name
        # queued again on a later commit is another execution, with a parent of its own.
        baseline = os.environ.get("DVC_EXP_BASELINE_REV") or commit
        key, name = f"exp:{experiment}@{baseline[:12]}", experiment
    else:
        digest = hashlib.sha256(json.dumps(as_dict(params), sort_keys=True).encode()).hexdigest()[:12]
        key, name = f"repro:{commit[:12]}:{digest}", f"repro@{commit[:8]}"
    schema = type(params)  # the pipeline's params class knows its committed file
    reference = committed_params(root, params.base.profile or schema.PARAMS_FILE, schema)
    described = {**(variant_changes(params, reference) if reference is not None else {}),
                 SEED_KEY: params.base.seed, PROFILE_KEY: params.base.profile}
    return Execution(key=key, name=name, variant=variant_label(params, reference),
                     seed=params.base.seed, commit=commit, params=described)


# --- what the stages of an execution report to its parent run ---------------------------------------------------

def headline_metrics(stage: str) -> dict[str, float]:
    """A stage's headline numbers from `metrics/<stage>.json` (`evaluate@linf`: evaluate_linf.json), named
    `<stage>.<key>` (`evaluate_linf.robust_acc`: the threat in the stage name, not repeated in the key); numbers and
    booleans only. Empty when the stage writes no such file (mix, export)."""
    prefix, _, threat = stage.partition("@")
    name = f"{prefix}_{threat}" if threat else prefix
    path = layout.metrics_file(name)
    if not path.is_file():  # never opened when absent: opening is reading, for the audit of what a stage reads
        return {}
    try:
        numbers = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        print(f"dmat: {path} is unreadable ({err}); its numbers are left off the pipeline run", file=sys.stderr)
        return {}
    return {f"{name}.{key.removeprefix(f'{threat}_') if threat else key}": float(value)
            for key, value in numbers.items() if isinstance(value, int | float)}


def reused_stages(exclude: set[str]) -> list[str]:
    """The pipeline's stages with a metrics file, but not those in `exclude` (DVC stage names), whose outputs DVC
    finds up to date with the workspace's params and inputs: stages this execution took from DVC's run cache or
    found current, without running them.

    A stage downstream of the one running now cannot be read-locked by DVC (its inputs are being written): it is
    not up to date, and so not reused. A stage run by hand (not by DVC) reuses none."""
    if not os.environ.get("DVC_STAGE"):  # run by hand, not by DVC: nothing was restored for this execution
        return []
    try:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        # The repository around the stage's working directory, not $DVC_ROOT: a `dvc queue` worker runs the
        # experiment in a copy under .dvc/tmp/exps/ and still sets DVC_ROOT to the original checkout
        repo = Repo()
    except Exception:  # not a DVC project, or DVC cannot read it: nothing is known to be reused
        return []
    reused = []
    try:
        # DVC releases its repository lock while a stage's command runs; asking a stage whether it changed needs it
        with repo.lock:
            for stage in repo.index.stages:
                name = getattr(stage, "addressing", "")
                if name not in exclude and layout.metrics_file(name.replace("@", "_")).is_file():
                    try:
                        if not stage.changed():
                            reused.append(name)
                    except DvcException:  # read-locked by the running stage: downstream of it
                        continue
    except Exception as err:  # a broken dvc.yaml or dvc.lock, or the lock held: DVC itself will say so
        print(f"dmat: cannot ask DVC which stages are up to date ({err!r})", file=sys.stderr)
    finally:
        repo.close()
    return sorted(reused)


def pipeline_status(stage_runs: Iterable[tuple[str, str, int]]) -> tuple[str, list[str]]:
    """How a pipeline execution stands after a stage ended, from its stage runs (stage, status, start time): the
    latest run of each stage counts (a stage rerun after a failure replaces it). FAILED naming every stage whose
    latest run failed, else KILLED if one was interrupted, else FINISHED. A run still RUNNING is the stage running
    now or one killed without a chance to say so (SIGKILL): neither ends the pipeline."""
    latest: dict[str, tuple[int, str]] = {}
    for stage, status, started in stage_runs:
        if stage not in latest or started >= latest[stage][0]:
            latest[stage] = (started, status)
    failed = sorted(stage for stage, (_, status) in latest.items() if status == "FAILED")
    killed = sorted(stage for stage, (_, status) in latest.items() if status == "KILLED")
    if failed:
        return "FAILED", failed
    return ("KILLED", killed) if killed else ("FINISHED", [])


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None
