"""Shared fixtures: small generated image folders, the offline CIFAR-10 archive, running `dmat`."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TINY_CLASSES = ("apple", "banana", "cherry")
BIN_DIR = Path(sys.executable).parent


def class_image(label: int, index: int, size: int = 8) -> np.ndarray:
    """A small RGB image whose colour says its class (so models can learn it) plus index noise."""
    rng = np.random.default_rng(1000 * label + index)
    base = np.zeros((size, size, 3), dtype=np.int64)
    base[..., label % 3] = 200
    return np.clip(base + rng.integers(0, 40, size=base.shape), 0, 255).astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_image_folder(root: Path, per_class: dict[str, int] | None = None,
                      classes: tuple[str, ...] = TINY_CLASSES, size: int = 8) -> Path:
    """train/<class>/*.png and test/<class>/*.png under `root`."""
    per_class = per_class or {"train": 12, "test": 4}
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i:04d}.png").write_bytes(encode_png(class_image(label, i, size)))
    return root


def make_archive(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return archive


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "folder")


@pytest.fixture
def image_archive(tmp_path: Path, image_folder: Path) -> Path:
    return make_archive(image_folder, tmp_path / "tiny.tar.gz")


@pytest.fixture
def cifar_archive() -> Path:
    if not SHARED_ARCHIVE.is_file():
        pytest.skip(f"offline CIFAR-10 archive not found at {SHARED_ARCHIVE}")
    return SHARED_ARCHIVE


@pytest.fixture(autouse=True)
def _isolated_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never write to the user's MLflow server: each uses the store of its own working dir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def write_params(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run_dmat(*args: str, cwd: Path, env: dict[str, str] | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `dmat` command for real, as DVC does."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env["PATH"] = f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    full_env.update(env or {})
    return subprocess.run([str(BIN_DIR / "dmat"), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
