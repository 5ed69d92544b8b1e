"""`base.precision: auto` decides once per machine and workload, not once per run.

The probe's timings follow the machine's momentary load: a stage started next to a test suite can measure
fp32 faster where a quiet run measured bf16, and then trains, samples and scores differently. So the
first decision for a (machine, workload) pair is kept in a small JSON file outside the project and
every later run on that machine reuses it, whatever its load: same params, code and data then give the
same outputs, which is what DVC assumes.

- The machine: the CPU model and the flags that decide low-precision speed, torch's thread count, or
  the GPU's name and compute capability; torch's version.
- The workload: the stage, its network and per-process batch, the number of processes, and the
  candidate settings the params leave open.

Decisions live in `$DMAT_CACHE_DIR/precision/` (default `$XDG_CACHE_HOME/dmat`, else `~/.cache/dmat`), one
file per key, written once: when two processes decide the same key at once the first file wins and
both use it. `dmat precision show` lists them, `dmat precision clear` removes them (the next run probes
again).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# CPU flags that change which precision and memory format are fastest (bf16/fp16 arithmetic, AMX tiles).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx_vnni")
FORMAT = "dmat-precision-decision-1"


def cache_dir() -> Path:
    """Where decisions are kept: $DMAT_CACHE_DIR, else $XDG_CACHE_HOME/dmat, else ~/.cache/dmat (+ /precision)."""
    root = os.environ.get("DMAT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dmat"
    return Path(root) / "precision"


def machine(device: str) -> dict[str, Any]:
    """What identifies this machine's speed for the probe: CPU model, flags and threads, or the GPU."""
    import torch

    if torch.device(device).type == "cuda":
        index = torch.cuda.current_device()
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(index),
                "capability": list(torch.cuda.get_device_capability(index)), "cuda": torch.version.cuda,
                "torch": torch.__version__}
    model, flags = _cpu_info()
    return {"device": "cpu", "cpu": model, "flags": [f for f in SPEED_FLAGS if f in flags],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (Linux /proc/cpuinfo; elsewhere the platform's processor name)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), set()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get("model name", platform.machine()), set(fields.get("flags", "").split())


def decision_key(machine_info: Mapping[str, Any], workload: Mapping[str, Any], candidates: Sequence[str]) -> str:
    """A short stable key for one machine, workload and set of candidate settings."""
    text = json.dumps({"machine": machine_info, "workload": workload, "candidates": list(candidates)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def recall(key: str) -> dict[str, Any] | None:
    """The decision kept under `key`, or None (also for an unreadable file: the caller probes again)."""
    try:
        record = json.loads((cache_dir() / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def keep(key: str, decision: Mapping[str, Any], machine_info: Mapping[str, Any], workload: Mapping[str, Any],
         candidates: Sequence[str]) -> dict[str, Any]:
    """Keep `decision` (a `Decision.record()`) under `key` unless one is there already; return the one kept.

    Written to a temporary file and linked into place, which fails when the name exists: of two
    processes deciding at once, the first one's file stays and the second adopts it."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "key": key, "decision": dict(decision), "machine": dict(machine_info),
              "workload": dict(workload), "candidates": list(candidates), "host": platform.node(),
              "decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = directory / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    try:
        os.link(tmp, directory / f"{key}.json")
    except FileExistsError:
        kept = recall(key)
        if kept is not None:
            return kept
        os.replace(tmp, directory / f"{key}.json")  # an unreadable leftover: ours replaces it
    finally:
        tmp.unlink(missing_ok=True)
    return record


def all_decisions() -> list[dict[str, Any]]:
    """Every readable decision, oldest first."""
    records = [recall(path.stem) for path in sorted(cache_dir().glob("*.json"))]
    return sorted((r for r in records if r is not None), key=lambda r: r.get("decided_at", ""))


def forget(keys: Sequence[str] = ()) -> list[str]:
    """Remove the decisions named by `keys` (key prefixes), or all of them; return the keys removed."""
    removed = []
    for path in sorted(cache_dir().glob("*.json")):
        if not keys or any(path.stem.startswith(prefix) for prefix in keys):
            path.unlink(missing_ok=True)
            removed.append(path.stem)
    return removed
