"""Tracking: the store location survives DVC's temporary copies; an unreachable server fails fast."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from dmat.files import project_root
from dmat.tracking import TrackingError, check_reachable
from tests.conftest import run_dmat, write_params


def test_project_root_looks_through_dvc_temp_copies(tmp_path: Path) -> None:
    (tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc" / "src").mkdir(parents=True)
    assert project_root(tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc" / "src") == tmp_path.resolve()
    assert project_root(tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc") == tmp_path.resolve()


def test_project_root_is_the_dvc_project(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert project_root(tmp_path / "a" / "b") == tmp_path.resolve()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        check_reachable(uri)


def test_stage_with_unreachable_server_exits_in_seconds(tmp_path: Path, image_archive: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    write_params(tmp_path / "params.yaml", f"data:\n  path: {image_archive}\n  val_size: 3\n")
    started = time.monotonic()
    result = run_dmat("prepare", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 1 and uri in result.stderr and "unreachable" in result.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "data" / "real").exists()


def test_params_paths_resolve_against_the_project_root_from_dvc_temp_copies(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run --queue` runs stages in <root>/.dvc/tmp/exps/<name>: ../shared is beside <root>, not the copy."""
    from dmat.files import in_project

    (tmp_path / ".dvc").mkdir()
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert in_project("../shared/data.tgz") == tmp_path.resolve() / "../shared/data.tgz"
    assert in_project("/abs/data.tgz") == Path("/abs/data.tgz")
    monkeypatch.chdir(tmp_path)
    assert in_project("../shared/data.tgz") == Path("../shared/data.tgz")  # in the project itself: as written
