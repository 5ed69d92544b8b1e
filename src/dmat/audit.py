"""Which project files a stage really opens, checked against what it declares (`dmat.pipeline`).

DVC reruns a stage only when a declared dependency changes, so a stage that reads a file it does not
declare can be left stale silently. With `DMAT_AUDIT=<file>` in the environment, every `dmat <stage>`
process records each file of the project it opens (a Python audit hook on `open`: numpy, torch and the
standard library all go through it) and appends them, one JSON line per file, to that file when it
exits. `undeclared(records)` then names every read that is neither a declared input nor one of the
stage's own outputs, and every write outside its declared outputs. The end-to-end tests run the tiny
pipeline this way.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

ENV = "DMAT_AUDIT"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# Where a stage may open files without declaring them: its params, the code, the tracking store, DVC's and git's
# own files, the resumable checkpoints it keeps until it publishes (.dmat/), and torchvision's download folder.
UNDECLARED_OK = ("params.yaml", "src/", ".dmat/", ".dvc/", ".git/", "mlflow.db", "mlruns/", "data/downloads/")
# What DVC reads when a stage asks it which stages are current (dmat.execution): the pipeline and its ignore files.
DVC_OWN_FILES = ("dvc.yaml", "dvc.lock", "params.yaml", ".gitignore", ".dvcignore")  # params: of every pipeline
STAGING = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-[^/]*$")  # dmat.files.atomic_path's siblings of a target


def install(stage: str) -> None:
    """Record the project files this process opens, when `DMAT_AUDIT` names a file to append them to."""
    target = os.environ.get(ENV)
    if not target:
        return
    root, opened = Path.cwd().resolve(), {}

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
            return
        path = Path(os.fsdecode(args[0]))
        # relative to the directory the process is in now: libraries (MLflow saving a model) chdir into temp dirs
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if path.is_relative_to(root):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
            key = unstaged(path.relative_to(root).as_posix())
            opened[key] = opened.get(key, False) or writes

    def dump() -> None:
        # A read of a path that does not exist is a library probing (MLflow looks for a local `model` folder before
        # logging one), nor is opening a folder: only files that exist when the stage ends are recorded as read.
        records = [(p, w) for p, w in sorted(opened.items()) if w or (root / p).is_file()]
        with open(target, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"stage": stage, "path": p, "write": w}) + "\n" for p, w in records)

    atexit.register(dump)
    sys.addaudithook(hook)


def unstaged(path: str) -> str:
    """A path with atomic_path's temporary siblings named as the target they become."""
    return "/".join(match["name"] if (match := STAGING.match(part)) else part for part in path.split("/"))


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def undeclared(records: Iterable[dict]) -> list[str]:
    """What the audited stages opened without declaring it: '<stage> reads|writes <path>' per file."""
    from dmat.pipeline import STAGES

    by_command = {declared.command: declared for declared in STAGES}
    problems = []
    for record in records:
        declared, path = by_command.get(record["stage"]), record["path"]
        if (declared is None or path.startswith(UNDECLARED_OK) or path.rsplit("/", 1)[-1] in DVC_OWN_FILES
                or "/" not in path and path.endswith(".yaml")):
            continue
        outputs = [str(w.path) for w in declared.writes]
        inputs = [str(r.path) for r in declared.reads]
        allowed = outputs if record["write"] else inputs + outputs
        if not any(_within(path, entry) for entry in allowed):
            problems.append(f"{declared.name} {'writes' if record['write'] else 'reads'} {path}")
    return sorted(set(problems))


def _within(path: str, entry: str) -> bool:
    """Whether `path` is `entry` or inside it; a foreach `${key}` matches any one path component."""
    pattern = re.escape(entry).replace(re.escape("${key}"), "[^/]+")
    return re.fullmatch(f"{pattern}(/.*)?", path) is not None
