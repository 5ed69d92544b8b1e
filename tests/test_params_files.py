"""One set of defaults: params.yaml is the rendering of the defaults in src/dmat/config.py, each profile holds only
what it changes (with a reason each); the params files they make survive `dvc exp run -S` (DVC rewrites the file as
YAML 1.2); `dmat params check/apply/diff` work without running a stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dmat.config import Params, ParamsError, as_dict, flatten, load_params, read_yaml
from dmat.profiles import load_profile, profile_title, read_profile, render
from tests.conftest import REPO_ROOT, run_dmat

PROFILES = sorted((REPO_ROOT / "profiles").glob("*.yaml"))


@pytest.fixture(params=["params.yaml", *(p.relative_to(REPO_ROOT).as_posix() for p in PROFILES)])
def committed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params.yaml, or the params file a profile makes (`dmat params apply`)."""
    if request.param == "params.yaml":
        return REPO_ROOT / "params.yaml"
    params, reasons = load_profile(request.param, REPO_ROOT)
    path = tmp_path_factory.mktemp("applied") / "params.yaml"
    path.write_text(render(params, reasons, profile_title(request.param)))
    return path


def dvc_set_params(path: Path, *overrides: str) -> None:
    """What `dvc exp run -S KEY=VALUE` does to a params file: DVC's own code path (ruamel round-trip dump)."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(path), list(overrides))


def test_params_yaml_is_the_rendering_of_the_defaults() -> None:
    assert (REPO_ROOT / "params.yaml").read_text() == render(Params()), (
        "params.yaml differs from the defaults in src/dmat/config.py: change defaults there, then `dmat params "
        "render`")


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_a_profile_holds_only_its_changes_each_with_a_reason(profile: Path) -> None:
    changes, reasons = read_profile(profile.read_text(), str(profile))
    assert len(changes) >= 5 and all("." in key for key in changes)  # dotted keys: a list of differences
    assert set(reasons) == set(changes), f"no reason given for {sorted(set(changes) - set(reasons))}"
    applied = flatten(as_dict(load_profile(profile.relative_to(REPO_ROOT), REPO_ROOT)[0]))
    defaults = flatten(as_dict(Params()))
    same = [key for key in changes if not isinstance(changes[key], dict) and applied[key] == defaults[key]]
    assert not same, f"{profile.name} spells defaults again: {same}"


def test_params_apply_writes_what_the_profile_makes(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    shutil.copy(REPO_ROOT / "profiles/cpu-experiment.yaml", tmp_path / "profiles")
    result = run_dmat("params", "apply", "profiles/cpu-experiment.yaml", "--out", "made.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    made = load_params(tmp_path / "made.yaml")
    assert made == load_profile("profiles/cpu-experiment.yaml", REPO_ROOT)[0]
    assert made.base.profile == "profiles/cpu-experiment.yaml" and made.train.epochs == 20
    assert "(profile; default 3)" in (tmp_path / "made.yaml").read_text()
    diff = run_dmat("params", "diff", "made.yaml", cwd=tmp_path)
    assert "train.epochs: 20" in diff.stdout.splitlines() and "mix.synthetic_fraction: 0.5" in diff.stdout


def test_dvc_round_trip_keeps_the_resolved_config(committed: Path, tmp_path: Path) -> None:
    copy = tmp_path / "params.yaml"
    shutil.copy(committed, copy)
    before = as_dict(load_params(copy))
    fraction = before["mix"]["synthetic_fraction"]
    dvc_set_params(copy, f"mix.synthetic_fraction={fraction}")  # the same value: only DVC's rewrite changes
    assert copy.read_text() != committed.read_text(), "DVC did not rewrite the file: the test proves nothing"
    assert as_dict(load_params(copy)) == before


def test_a_dvc_override_changes_exactly_its_key(committed: Path, tmp_path: Path) -> None:
    copy = tmp_path / "params.yaml"
    shutil.copy(committed, copy)
    before = as_dict(load_params(copy))
    dvc_set_params(copy, "mix.synthetic_fraction=0", "train_diffusion.adversarial.mode=none", "base.seed=2")
    after = as_dict(load_params(copy))
    assert (after["mix"]["synthetic_fraction"], after["train_diffusion"]["adversarial"]["mode"],
            after["base"]["seed"]) == (0, "none", 2)
    after["mix"]["synthetic_fraction"] = before["mix"]["synthetic_fraction"]
    after["train_diffusion"]["adversarial"]["mode"] = before["train_diffusion"]["adversarial"]["mode"]
    after["base"]["seed"] = before["base"]["seed"]
    assert after == before


def test_params_are_read_as_yaml_1_2() -> None:
    """Words that YAML 1.1 turns into booleans stay strings; duplicate keys are refused."""
    assert read_yaml("a: off\nb: yes\nc: 1e-4\nd:\n") == {"a": "off", "b": "yes", "c": 1e-4, "d": None}
    with pytest.raises(ValueError, match="duplicate key"):
        read_yaml("a: 1\na: 2\n")


def test_duplicate_keys_in_a_params_file_are_a_params_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("mix:\n  synthetic_fraction: 0.3\n  synthetic_fraction: 0.5\n")
    with pytest.raises(ParamsError, match="not valid YAML.*duplicate key"):
        load_params(path)


def test_params_check_passes_a_valid_file_and_prints_the_resolved_config(tmp_path: Path) -> None:
    result = run_dmat("params", "check", str(REPO_ROOT / "params.yaml"), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("params.yaml: valid"), result.stderr
    (tmp_path / "params.yaml").write_text("train: {epochs: 2}\n")
    resolved = run_dmat("params", "check", "--resolved", cwd=tmp_path)
    assert resolved.returncode == 0, resolved.stderr
    config = read_yaml(resolved.stdout)
    assert config["train"]["epochs"] == 2 and config["train"]["loss"] == "trades"  # defaults filled in


def test_params_check_fails_with_the_stage_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  val_size: -5\n")
    result = run_dmat("params", "check", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"dmat params: error: {bad}: data.val_size = -5 is not allowed: "
                                     "expected an integer >= 0")
    missing = run_dmat("params", "check", cwd=tmp_path)
    assert missing.returncode == 2 and "params file not found" in missing.stderr
