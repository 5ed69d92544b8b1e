"""End-to-end `dvc repro` of the CPU default with fp32 forced vs `auto` (issue 16).

Clones this checkout's HEAD (`git clone --local`) into a temporary directory per run, points
data.path at the absolute path of the data this checkout uses, sets base.precision and
base.memory_format (fp32/contiguous, or auto/auto), and times `dvc repro` there with the clone's
own code (PYTHONPATH=<clone>/src). Runs alternate fp32, auto, fp32, auto... (`--rounds`), on one
machine in one session. Reports the wall time of every run and of each stage in it (from `dvc
repro`'s "Running stage" lines), the speed-up fp32/auto of the medians, and the machine. Needs
`dvc` on PATH and no other load on the machine for a meaningful figure.

    python -m benchmarks.repro_timing [--rounds 1] [--keep DIR]

`--keep DIR` leaves the clones in DIR (DIR/fp32-0, DIR/auto-0, ...): `benchmarks.equal_accuracy
--workspace DIR/fp32-0` then reuses the fp32 pipeline's data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.equal_accuracy import SETTINGS
from benchmarks.measure import machine

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def prepare_clone(target: Path, setting: str) -> None:
    subprocess.run(["git", "clone", "--quiet", "--local", str(REPO_ROOT), str(target)], check=True)
    params = (target / "params.yaml").read_text()
    data_path = re.search(r"(?m)^  path:[ \t]*([^\s#]+)", params)
    params = params.replace(data_path.group(0), f"  path: {(REPO_ROOT / data_path.group(1)).resolve()}", 1)
    precision, memory_format = SETTINGS[setting]
    for key, value in (("precision", precision), ("memory_format", memory_format)):
        params = re.sub(rf"(?m)^(  {key}:)[ \t]*[^\s#]+", rf"\g<1> {value}", params, count=1)
    (target / "params.yaml").write_text(params)


def timed_repro(clone: Path) -> dict:
    """Wall seconds of `dvc repro` in `clone`, and of each stage it ran."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # each clone's own mlflow.db
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(clone / "src"), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    with subprocess.Popen(["dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        for line in process.stdout:
            match = STAGE_LINE.search(line)
            if match:
                marks.append((match[1], time.perf_counter()))
        code = process.wait()
    ended = time.perf_counter()
    if code != 0:
        raise RuntimeError(f"dvc repro failed in {clone} (exit {code})")
    ends = [at for _, at in marks[1:]] + [ended]
    return {"seconds": round(ended - started, 1),
            "stages": {name: round(end - at, 1) for (name, at), end in zip(marks, ends, strict=True)}}


def run(rounds: int = 1, keep: Path | None = None) -> dict:
    root = keep or Path(tempfile.mkdtemp(prefix="dmat-repro-timing-"))
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for index in range(rounds):
            for setting in SETTINGS:
                clone = root / f"{setting}-{index}"
                prepare_clone(clone, setting)
                runs.append({"setting": setting, "round": index, **timed_repro(clone)})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    medians = {s: statistics.median(r["seconds"] for r in runs if r["setting"] == s) for s in SETTINGS}
    return {"machine": machine(), "rounds": rounds, "runs": runs,
            "median_seconds": medians, "speedup_auto_vs_fp32": round(medians["fp32"] / medians["auto"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repro_timing", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="fp32/auto pairs to run (alternating)")
    parser.add_argument("--keep", type=Path, default=None, help="leave the clones in this directory")
    args = parser.parse_args()
    print(json.dumps(run(args.rounds, args.keep), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
