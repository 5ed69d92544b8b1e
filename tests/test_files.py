"""Atomic outputs get the permissions of any file the user creates, so other accounts (containers) can read them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmat.files import atomic_path


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize("directory", [False, True])
def test_atomic_outputs_follow_the_umask(tmp_path: Path, umask_022: None, directory: bool) -> None:
    target = tmp_path / ("export" if directory else "model.onnx")
    with atomic_path(target, directory=directory) as tmp:
        if directory:
            (tmp / "model.onnx").write_bytes(b"onnx")
        else:
            tmp.write_bytes(b"onnx")
    expected = 0o755 if directory else 0o644
    assert stat.S_IMODE(target.stat().st_mode) == expected
