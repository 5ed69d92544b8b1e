"""Experiment grids (`dmat queue`, `dmat compare --grid`): the committed CPU-scale grid, what a bad grid is told,
and that queueing never leaves the profile behind in params.yaml."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dmat.config import load_params
from dmat.profiles import load_profile
from dmat.tools.grid import GridError, load_grid
from dmat.tools.queue import queue_commands
from tests.conftest import BIN_DIR, REPO_ROOT

PROFILE = "profiles/cpu-experiment.yaml"


def test_the_committed_grid_queues_every_variant_over_all_seeds_variant_by_variant() -> None:
    grid = load_grid(REPO_ROOT / "experiments/cpu-scale.yaml", REPO_ROOT)
    assert grid.experiment == load_profile(PROFILE, REPO_ROOT)[0].base.experiment
    assert grid.labels == {
        "generated": "baseline", "clean-no-at": 'train_diffusion.adversarial.mode="none"',
        "corrupt-no-at": 'train_diffusion.adversarial.mode="none" train_diffusion.corrupt.fraction=0.9',
        "corrupt-at": "train_diffusion.corrupt.fraction=0.9", "generated-long": "train_diffusion.steps=1440",
        "real-only": "mix.synthetic_fraction=0.0", "heldout-real": 'mix.source="heldout_real"'}
    # the 2×2 design corruption × diffusion AT, its interaction a planned contrast
    assert grid.contrasts["corruption-x-at"] == {"corrupt-at": 1, "corrupt-no-at": -1, "generated": -1,
                                                 "clean-no-at": 1}
    commands = queue_commands(grid)
    assert len(commands) == len(grid.variants) * len(grid.seeds) and len(grid.seeds) >= 3
    # Variant by variant: the two queue workers start on different seeds (two runs of one seed starting
    # together would both train its reference classifier), and real-only and heldout-real follow once
    # generated has made the models and samples they share (DVC's run cache then restores them).
    names, seeds = [name for name, _ in commands], len(grid.seeds)
    assert names[:2 * seeds] == [f"cpu-{variant}-s{seed}" for variant in ("generated", "clean-no-at")
                                 for seed in grid.seeds]
    assert names[-2 * seeds:] == [f"cpu-{variant}-s{seed}" for variant in ("real-only", "heldout-real")
                                  for seed in grid.seeds]
    name, argv = commands[-2 * seeds]
    assert argv[:6] == ["dvc", "exp", "run", "--queue", "-n", name]
    assert argv[6:] == ["-S", "mix.synthetic_fraction=0", "-S", "base.seed=0", "evaluate@linf", "evaluate_diffusion"]


def test_the_profile_is_the_cpu_default_but_for_what_the_experiment_needs() -> None:
    profile, default = load_profile(PROFILE, REPO_ROOT)[0], load_params(REPO_ROOT / "params.yaml")
    assert profile.base.profile == PROFILE and default.base.profile is None
    assert profile.evaluate.n >= 200 and list(profile.evaluate.threats) == ["linf"]
    assert profile.data.heldout_size == 10 * profile.generate.per_class  # the control: as many real images
    assert profile.train_diffusion == default.train_diffusion  # the generator under test is the committed one
    # pinned, so that a rerun on one machine repeats to the digit whatever the machine's load
    assert (profile.base.precision, profile.base.memory_format) == ("bf16", "channels_last")


def grid_file(tmp_path: Path, body: str) -> Path:
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles/p.yaml").write_text("base:\n  profile: profiles/p.yaml\nmix:\n  synthetic_fraction: 0.3\n"
                                              "train_diffusion:\n  adversarial:\n    mode: adversarial\n")
    path = tmp_path / "grid.yaml"
    path.write_text("profile: profiles/p.yaml\nseeds: [0, 1]\n" + body)
    return path


@pytest.mark.parametrize(("body", "message"), [
    ("variants:\n  a: {mix.no_such_key: 1}\n", "variant 'a': mix.no_such_key"),
    ("variants:\n  a: {mix.synthetic_fraction: 2}\n", "mix.synthetic_fraction"),
    ("variants:\n  a: {base.seed: 3}\n", "seeds are the grid's"),
    ("variants:\n  a: {}\n  b: {mix.synthetic_fraction: 0.3}\n", "variants 'a' and 'b' run the same params"),
    ("variants:\n  a: {}\nbaseline: z\n", "baseline 'z' is not one of the variants"),
    ("variants:\n  Bad_Name: {}\n", "variant name 'Bad_Name'"),
    ("variants:\n  a: {}\nextra: 1\n", "expected a mapping with 'profile' and 'variants'"),
    ("variants:\n  a: {}\n  b: {mix.synthetic_fraction: 0}\ncontrasts:\n  c: {a: 1, z: -1}\n",
     "contrast 'c': 'z' is not one of the variants"),
    ("variants:\n  a: {}\n  b: {mix.synthetic_fraction: 0}\ncontrasts:\n  c: {a: 1, b: 1}\n",
     "weights must sum to 0"),
])
def test_a_bad_grid_is_refused_naming_what_is_wrong(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(GridError, match=message.replace("(", r"\(")):
        load_grid(grid_file(tmp_path, body), tmp_path)


def test_a_profile_with_an_unknown_key_is_refused_naming_it(tmp_path: Path) -> None:
    path = grid_file(tmp_path, "variants:\n  a: {}\n")
    (tmp_path / "profiles/p.yaml").write_text("train.no_such_key: 1  # a typo\n")
    with pytest.raises(GridError, match="profile profiles/p.yaml: .*train.no_such_key is not a known key"):
        load_grid(path, tmp_path)


def test_queueing_restores_params_yaml_when_dvc_fails(tmp_path: Path) -> None:
    # Not a DVC repository: the first `dvc exp run --queue` fails; params.yaml must be the user's again.
    path = grid_file(tmp_path, "variants:\n  a: {}\n  b: {mix.synthetic_fraction: 0}\n")
    (tmp_path / ".dvc").mkdir()  # the project root for dmat, but no DVC repository for dvc
    original = "base:\n  seed: 5   # the user's own params\n"
    (tmp_path / "params.yaml").write_text(original)
    result = subprocess.run([str(BIN_DIR / "dmat"), "queue", str(path)], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": f"{BIN_DIR}:/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "failed for grid-a-s0" in result.stderr
    assert (tmp_path / "params.yaml").read_text() == original


def test_a_dry_run_prints_the_commands_and_queues_nothing(tmp_path: Path) -> None:
    path = grid_file(tmp_path, "name: t\nvariants:\n  a: {}\n  b: {mix.synthetic_fraction: 0}\n")
    result = subprocess.run([str(BIN_DIR / "dmat"), "queue", str(path), "--dry-run"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "dvc exp run --queue -n t-a-s0 -S base.seed=0", "dvc exp run --queue -n t-a-s1 -S base.seed=1",
        "dvc exp run --queue -n t-b-s0 -S mix.synthetic_fraction=0 -S base.seed=0",
        "dvc exp run --queue -n t-b-s1 -S mix.synthetic_fraction=0 -S base.seed=1"]


def test_only_the_named_variants_are_queued_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    path = grid_file(tmp_path, "name: t\nvariants:\n  a: {}\n  b: {mix.synthetic_fraction: 0}\n")
    dmat = [str(BIN_DIR / "dmat"), "queue", str(path), "--dry-run"]
    result = subprocess.run([*dmat, "--variant", "b"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and [line.split()[5] for line in result.stdout.splitlines()] == ["t-b-s0", "t-b-s1"]
    result = subprocess.run([*dmat, "--variant", "c"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no variant 'c'" in result.stderr


def test_compare_takes_a_baseline_by_its_variant_name_in_the_grid(tmp_path: Path) -> None:
    grid = load_grid(grid_file(tmp_path, "variants:\n  a: {}\n  b: {mix.synthetic_fraction: 0}\nbaseline: b\n"),
                     tmp_path)
    assert grid.baseline_label() == grid.labels["b"] == "mix.synthetic_fraction=0.0"
    assert grid.baseline_label("a") == grid.labels["a"]
    assert grid.baseline_label("mix.synthetic_fraction=0.0") == grid.labels["b"]  # a label as compare prints it
