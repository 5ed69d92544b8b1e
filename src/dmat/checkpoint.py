"""Checkpoints: written atomically, read with `weights_only=True` (a checkpoint is untrusted input)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from dmat.errors import CheckpointError
from dmat.files import atomic_path


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write never leaves a torn checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, *, map_location: str = "cpu") -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for torn or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a DMAT checkpoint (top level is {type(state).__name__})")
    return state


def load_resumable(path: str | Path, *, format: str, fingerprint: str, map_location: str = "cpu") -> dict | None:
    """The checkpoint at `path` if it is this run's to resume (same format and fingerprint), else None.

    Another configuration's leftover (a run killed before it changed params) is not an error: the run
    starts afresh and overwrites it.
    """
    if not Path(path).is_file():
        return None
    state = load_checkpoint(path, map_location=map_location)
    if state.get("format") != format or state.get("fingerprint") != fingerprint:
        return None
    return state


def publish(work: str | Path, out: str | Path, names: tuple[str, ...]) -> None:
    """Move a finished stage's checkpoints `names` from its work directory into its output directory.

    Each file is hard-linked (copied where links are impossible) before the work directory goes: a kill in
    between leaves the work directory whole, so the re-run resumes after its last step and publishes again.
    """
    work, out = Path(work), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = out / name
        target.unlink(missing_ok=True)
        try:
            os.link(work / name, target)
        except OSError:  # another file system, or links not allowed
            with atomic_path(target) as tmp:
                shutil.copyfile(work / name, tmp)
    shutil.rmtree(work)


def restore_training(state: dict[str, Any], *, model: Any, ema: Any | None, optimizer: Any) -> None:
    """Load the weights, their average (`ema` None: a stage that keeps none) and the optimiser of a resumable
    checkpoint."""
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])


def fingerprint(*parts: Any) -> str:
    """A short stable hash of configuration and input digests: a checkpoint resumes only its own run."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
