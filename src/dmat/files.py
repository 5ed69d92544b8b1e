"""Atomic file and directory writes (readers never see a half-written output), file digests, and where the
project is."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success rename it over `target`, on error delete it.

    The temporary lives in the same directory so the final rename never crosses file systems.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        # mkdtemp makes 0700: a container running as another user (the serving image) could not read the output.
        os.chmod(tmp, 0o777 & ~_umask())
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        _replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _replace(tmp: Path, target: Path) -> None:
    if tmp.is_dir():
        # os.replace cannot swap a non-empty directory: move the old one aside first.
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _remove(old)
    else:
        os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, pretty-printed with sorted keys so equal data gives equal bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def project_root(start: Path | None = None) -> Path:
    """The project's root: the directory holding `.dvc/`, looking through DVC's temporary copies."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    # `dvc exp run --temp/--queue` works in <root>/.dvc/tmp/exps/<name>/...: that copy belongs to <root>.
    for i in range(len(parts) - 1):
        if parts[i] == ".dvc" and parts[i + 1] == "tmp":
            return Path(*parts[:i])
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return here


def in_project(path: str | Path) -> Path:
    """A path from params.yaml: absolute as given, relative to the project root. In DVC's temporary copies
    (`dvc exp run --temp/--queue`), which hold only the repository's files, that is the real project's root,
    where the data directory beside the checkout and the download directory are."""
    path = Path(path)
    if path.is_absolute():
        return path
    root = project_root()
    return path if root == Path.cwd().resolve() else root / path
