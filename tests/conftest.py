"""Shared fixtures: small generated image folders, the offline CIFAR-10 archive, running `dmat`, the tiny pipeline."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TINY_CLASSES = ("apple", "banana", "cherry")
# A params `data` section's lines that take every image of a tiny data set (the defaults are CIFAR-10's CPU sizes).
EVERY_IMAGE = "  train_limit: null\n  test_limit: null\n  heldout_size: 0\n"
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


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository copy after one `dvc repro` with the e2e tests' tiny params (minutes), built once per session.

    Shared by every test that asks for it: read it, never change it. A test that writes into the project
    (runs a stage, `dvc exp run`, edits params) works on its own copy (`shutil.copytree`).
    """
    from tests.e2e.test_pipeline import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


@pytest.fixture(autouse=True)
def _isolated_tracking(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never write to the user's MLflow server: each uses the store of its own working dir. Nor to the
    machine's kept precision decisions: each test's stages decide in a cache of their own."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DMAT_CACHE_DIR", str(tmp_path_factory.mktemp("dmat-cache")))


def write_params(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run_dmat(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600,
             dmat: Path = BIN_DIR / "dmat") -> subprocess.CompletedProcess:
    """Run the installed `dmat` command (or another launcher of it) for real, as DVC does."""
    return subprocess.run([str(dmat), *args], cwd=cwd, env={**_stage_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _stage_env() -> dict[str, str]:
    """The environment a stage gets from DVC here: the venv on PATH, the working directory's MLflow store."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_torchrun(*args: str, cwd: Path, nproc: int = 2, module: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N dmat ...` for real (gloo on the CPU); with `module`,
    `torchrun ... -m MODULE ...` with the repository root importable (test helpers run that way)."""
    program = ["-m", module] if module else [str(BIN_DIR / "dmat")]
    command = [str(BIN_DIR / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *program, *args]
    env = _stage_env()
    if module:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def killed_before_publishing(workdir: Path, work: Path, published: Path, outputs: tuple[str, ...]) -> None:
    """Leave a finished model stage as a kill after its last epoch's checkpoint, before it published, leaves it for
    DVC's re-run: the checkpoints back in the work directory, everything published and every other output gone."""
    work.mkdir(parents=True)
    for name in ("best.pt", "last.pt"):
        shutil.copyfile(published / name, work / name)
    shutil.rmtree(published)
    for path in outputs:
        (workdir / path).unlink()


def kill_when_written(*args: str, cwd: Path, watch: Path, timeout: float = 300) -> None:
    """Start `dmat ARGS`, SIGKILL it as soon as `watch` exists (its first checkpoint), wait for it to die."""
    process = subprocess.Popen([str(BIN_DIR / "dmat"), *args], cwd=cwd, env=_stage_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not watch.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()


def tiny_bn_net(channels: int, classes: int) -> nn.Module:
    """Conv + BatchNorm + SiLU + linear on 8×8 inputs, seeded: the smallest net with BatchNorm state."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.SiLU(),
                         nn.Flatten(), nn.Linear(channels * 4 * 4, classes))
