"""torchvision's own on-disk CIFAR layouts, written small, and its checksum table pointed at them.

torchvision reads CIFAR only after checking every file against md5s that are class attributes of its
dataset classes (`train_list`, `test_list`, `meta`, and `tgz_md5` for the downloaded archive). A
fixture cannot match the real md5s, so tests point those attributes at the fixture's files: in the
test process with `monkeypatch`, and in `dmat` subprocesses (also those DVC starts) through a
test-only `dmat` launcher that sets them before running the real CLI. DMAT itself has no way to
change or skip the checksums, so users always get torchvision's verification.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import class_image

# name -> (torchvision class, extracted folder, downloaded archive, train files, test file, meta file, meta key,
#          label key)
LAYOUTS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta", "label_names", "labels"),
    "cifar100": ("CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz", ["train"], "test", "meta",
                 "fine_label_names", "fine_labels"),
}
# An address where nothing listens: set as the proxy, any download attempt fails at once, never reaching the network.
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}

Checksums = list[tuple[str, str, Any]]  # (torchvision.datasets class name, attribute, value)


def fixture_images(count: int, classes: int, offset: int) -> tuple[np.ndarray, list[int]]:
    """`count` 32×32 images, labels cycling through the classes; the colour channel says the class."""
    labels = [i % classes for i in range(count)]
    return np.stack([class_image(label, offset + i, size=32) for i, label in enumerate(labels)]), labels


def write_cifar(root: Path, name: str, train_per_class: int, test_per_class: int, *, archived: bool = False,
                class_names: list[str] | None = None) -> Checksums:
    """torchvision's files for `name` under `root`: the extracted folder, or (`archived`) only the archive
    the download would leave there. Returns the checksum table that matches them."""
    torchvision_class, folder, archive_name, train_files, test_file, meta_file, meta_key, label_key = LAYOUTS[name]
    class_names = class_names or [f"class{c:03d}" for c in range(100 if name == "cifar100" else 10)]
    n = len(class_names)
    files: dict[str, bytes] = {}
    train_images, train_labels = fixture_images(train_per_class * n, n, 0)
    for file, rows in zip(train_files, np.array_split(np.arange(len(train_labels)), len(train_files)), strict=True):
        files[file] = _batch(train_images[rows], [train_labels[i] for i in rows], label_key)
    test_images, test_labels = fixture_images(test_per_class * n, n, 100_000)
    files[test_file] = _batch(test_images, test_labels, label_key)
    files[meta_file] = pickle.dumps({meta_key: class_names})
    md5 = {file: hashlib.md5(data).hexdigest() for file, data in files.items()}
    checksums: Checksums = [
        (torchvision_class, "train_list", [[file, md5[file]] for file in train_files]),
        (torchvision_class, "test_list", [[test_file, md5[test_file]]]),
        (torchvision_class, "meta", {"filename": meta_file, "key": meta_key, "md5": md5[meta_file]}),
    ]
    root.mkdir(parents=True, exist_ok=True)
    if archived:
        with tarfile.open(root / archive_name, "w:gz", compresslevel=1) as tar:
            for file, data in files.items():
                info = tarfile.TarInfo(f"{folder}/{file}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        checksums.append((torchvision_class, "tgz_md5", hashlib.md5((root / archive_name).read_bytes()).hexdigest()))
    else:
        (root / folder).mkdir()
        for file, data in files.items():
            (root / folder / file).write_bytes(data)
    return checksums


def _batch(images: np.ndarray, labels: list[int], label_key: str) -> bytes:
    """One pickled batch as torchvision reads it: rows of 3072 bytes (channel-major 32×32) and labels."""
    return pickle.dumps({"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), label_key: labels})


def apply_checksums(checksums: Checksums, monkeypatch) -> None:
    """Point torchvision's checksum table at the fixture's files, in this process."""
    import torchvision.datasets as tvd

    for class_name, attribute, value in checksums:
        monkeypatch.setattr(getattr(tvd, class_name), attribute, value)


def dmat_launcher(bin_dir: Path, checksums: Checksums) -> Path:
    """A `dmat` executable in `bin_dir` that sets the checksum table, then runs the real CLI.

    Put `bin_dir` first on PATH and every `dmat` started from there (by a test or by DVC) reads the fixture."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / "dmat"
    launcher.write_text(f"""#!{sys.executable}
import json
import sys

import torchvision.datasets as tvd

from dmat.cli import main

for class_name, attribute, value in json.loads({json.dumps(checksums)!r}):
    setattr(getattr(tvd, class_name), attribute, value)
sys.exit(main())
""", encoding="utf-8")
    launcher.chmod(0o755)
    return launcher
