"""The SLURM array task's stop, without a cluster: what it waits for before it reports and requeues."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from dmat.tools.slurm_task import StepFailed, Task

# What `dvc exp run` does on SIGTERM: it dies at once (no handler), while the stage it started, in its process group,
# ends its MLflow run and writes its checkpoint before it exits.
STAGE = """import pathlib, signal, sys, time
def stop(*_):
    time.sleep(2)
    pathlib.Path(sys.argv[1]).write_text("ended")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[2]).write_text("ready")
time.sleep(60)
"""
DVC = "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', *sys.argv[1:]])\ntime.sleep(60)"


def task(tmp_path: Path) -> Task:
    spec = {"variants": {"v": {"0": {"experiment": "t-v-s0", "seed": 0, "set": []}}}, "workdir": str(tmp_path),
            "logs": str(tmp_path), "results": str(tmp_path), "tracking_uri": "http://127.0.0.1:1", "max_requeues": 1}
    return Task(spec, "v", "0")


def test_a_task_stopped_at_its_time_limit_goes_on_only_once_the_stage_has_ended(tmp_path: Path) -> None:
    """Otherwise the requeued attempt could resume in the same checkout while the old stage still writes there."""
    ended, ready = tmp_path / "ended", tmp_path / "ready"
    stopping = task(tmp_path)
    previous = signal.signal(signal.SIGUSR1, stopping.on_time_limit)

    def time_limit_warning() -> None:  # what SLURM's --signal=B:USR1@S sends the batch script
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    warner = threading.Thread(target=time_limit_warning)
    warner.start()
    try:
        with pytest.raises(StepFailed):
            stopping.step("dvc exp run", [sys.executable, "-c", DVC, STAGE, str(ended), str(ready)], cwd=tmp_path)
    finally:
        warner.join()
        signal.signal(signal.SIGUSR1, previous)
    assert stopping.stop_reason and stopping.requeue
    assert ended.is_file(), "the step returned while the stage it started was still stopping"
