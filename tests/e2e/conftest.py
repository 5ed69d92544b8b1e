"""The end-to-end tests' shared grid: two variants × three seeds queued as DVC experiments, built once per session.

The copy of the session's tiny pipeline has seed 1 and synthetic fraction 0.5 committed; a grid file queued with
`dmat queue` (as the CPU-scale experiment is) adds seeds 2 and 3 and fraction 0, from a committed profile that is those
params. Only the stages up to `evaluate@linf` run; DVC's run cache shares what the grid's points share.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import BIN_DIR
from tests.e2e.test_pipeline import project_copy, run

REAL_ONLY = "mix.synthetic_fraction=0.0"  # labels show the validated value (a float), however typed
PROFILE = "profiles/e2e.yaml"
GRID = f"""profile: {PROFILE}
name: e2e
seeds: [1, 2, 3]
baseline: generated
targets: [evaluate@linf]
variants:
  generated: {{}}
  real-only: {{mix.synthetic_fraction: 0}}
"""


@pytest.fixture(scope="session")
def variants(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny pipeline after the grid's queue has run (read it, never change it)."""
    return build_grid(project_copy(tiny_pipeline, tmp_path_factory.mktemp("variants")))


def build_grid(project: Path) -> Path:
    """Commit the grid's profile and grid file in `project` (a tiny pipeline), queue the grid and wait for it."""
    params = (project / "params.yaml").read_text()
    profile = params.replace("compile: false}", f"compile: false, profile: {PROFILE}}}", 1)
    assert profile != params
    (project / PROFILE).write_text(profile)
    (project / "grid.yaml").write_text(GRID)
    run(["git", "add", PROFILE, "grid.yaml"], project)
    run(["git", "commit", "-q", "-m", "e2e grid"], project)
    committed = (project / "params.yaml").read_bytes()
    # Followed as users follow a grid: `--watch` asks again when `dvc queue status` fails for a moment, starts the
    # worker again if DVC's exits early, and exits 1 if an experiment failed. One worker: on 2 cores, two concurrent
    # evaluations took 230-380 s each where one alone took 6-30 s (the grid 897 s against 415 s). Queued variant-major,
    # real-only seed 1 runs after generated seed 1 and takes their shared stages from the run cache (test_mlflow_ui).
    run([str(BIN_DIR / "dmat"), "queue", "grid.yaml", "--start", "1", "--watch"], project)
    assert (project / "params.yaml").read_bytes() == committed  # the profile is not left behind
    return project
