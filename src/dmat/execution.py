"""Which pipeline execution, and which variant, a stage run belongs to.

A *variant* is what a run's params change with respect to the committed `params.yaml` (HEAD) — or to
the committed profile that `base.profile` names, for an experiment that starts from one — the
seed excluded: runs of one variant over several seeds carry the same label, so they group together.
A *pipeline execution* is one `dvc exp run` (its DVC experiment name) or one `dvc repro` of a commit
with given params: every stage run of it becomes a child of one MLflow parent run, so the UI shows one
row per pipeline outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmat.config import Params, ParamsError, as_dict, flatten, parse_params, read_yaml

SEED_KEY = "base.seed"
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


def git_commit(root: Path) -> str:
    out = _git(root, "rev-parse", "HEAD")
    return out.strip() if out is not None else "unknown"


def committed_params(root: Path, path: str = "params.yaml", schema: type = Params) -> dict[str, Any] | None:
    """A params file (params.yaml or a profile; another pipeline's with its `schema`) at HEAD, resolved (defaults
    filled in) and flattened; None when there is none or it is invalid."""
    text = _git(root, "show", f"HEAD:{path}")
    if text is None:
        return None
    try:
        return flatten(as_dict(parse_params(read_yaml(text), schema)))
    except (ValueError, ParamsError):
        return None


def variant_label(params: Any, committed: dict[str, Any] | None) -> str:
    """The params that differ from the committed ones (seed excluded), as a sorted `key=value` list."""
    if committed is None:
        return UNKNOWN
    current = flatten(as_dict(params))
    changed = sorted(f"{key}={json.dumps(value)}" for key, value in current.items()
                     if key != SEED_KEY and committed.get(key) != value)
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
    return Execution(key=key, name=name, variant=variant_label(params, reference),
                     seed=params.base.seed, commit=commit)


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None
