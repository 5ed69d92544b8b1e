"""The committed params.yaml and every profile survive `dvc exp run -S` (DVC rewrites the file as YAML 1.2),
and `dmat params check` validates a file without running a stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dmat.config import ParamsError, as_dict, load_params, read_yaml
from tests.conftest import REPO_ROOT, run_dmat

PARAM_FILES = [REPO_ROOT / "params.yaml", *sorted((REPO_ROOT / "profiles").glob("*.yaml"))]


def dvc_set_params(path: Path, *overrides: str) -> None:
    """What `dvc exp run -S KEY=VALUE` does to a params file: DVC's own code path (ruamel round-trip dump)."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(path), list(overrides))


def test_there_are_profiles_to_check() -> None:
    assert len(PARAM_FILES) >= 2, PARAM_FILES


@pytest.mark.parametrize("committed", PARAM_FILES, ids=lambda p: p.name)
def test_dvc_round_trip_keeps_the_resolved_config(committed: Path, tmp_path: Path) -> None:
    copy = tmp_path / "params.yaml"
    shutil.copy(committed, copy)
    before = as_dict(load_params(copy))
    fraction = before["mix"]["synthetic_fraction"]
    dvc_set_params(copy, f"mix.synthetic_fraction={fraction}")  # the same value: only DVC's rewrite changes
    assert copy.read_text() != committed.read_text(), "DVC did not rewrite the file: the test proves nothing"
    assert as_dict(load_params(copy)) == before


@pytest.mark.parametrize("committed", PARAM_FILES, ids=lambda p: p.name)
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
