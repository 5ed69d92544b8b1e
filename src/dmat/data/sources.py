"""Where real images come from: torchvision datasets, image folders (directory or tar archive), npz,
or `auto`: the image folder or archive at `data.path` when it exists, else torchvision's download.

Each source gives, per split, the labels of every item up front (cheap: from folder names or
label arrays) and a reader that decodes only the items asked for. `prepare` picks its subsets from
the labels first, so a small CPU run never decodes the whole dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from dmat.errors import DataError
from dmat.files import sha256_file

SPLITS = ("train", "test")
# Dataset name -> its class in torchvision.datasets.
TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN"}


@dataclass
class SplitSource:
    """One split of a source: labels for every item, in source order, and a reader."""

    labels: np.ndarray  # int64, one per item
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]  # H, W, C
    # Given ascending item indices, yields (index, H×W×C uint8 image) for each, in that order.
    read: Callable[[np.ndarray], Iterator[tuple[int, np.ndarray]]]
    # False when the source order means nothing (image folders are sorted by class): prepare then
    # writes a seeded shuffle, so "the first n test points" is a fair sample.
    ordered: bool
    description: dict[str, Any] = field(default_factory=dict)


def open_source(source: str, path: str | Path, *, name: str, download_dir: str | Path | None = None,
                resize: tuple[int, int] | None = None,
                classes: tuple[str, ...] | None = None) -> dict[str, SplitSource]:
    """Open a data source; returns {"train": ..., "test": ...} with identical class lists.

    `path` is the image folder/archive or npz directory; `download_dir` (needed by auto and torchvision)
    is where torchvision's files are, downloaded there once when missing. Each split's `description`
    says what was opened: kind, path and sha256, so that data from different sources is never confused.
    """
    if source in ("auto", "torchvision") and download_dir is None:
        raise ValueError(f"data source {source!r} needs a download_dir")
    if source == "auto":
        return _open_auto(Path(path), Path(download_dir), name, resize)
    if source == "imagefolder":
        return _open_imagefolder(Path(path), resize)
    if source == "npz":
        return _open_npz(Path(path), classes)
    if source == "torchvision":
        try:
            return _open_torchvision(name, Path(download_dir))
        except DownloadFailed as err:
            raise DataError(f"{err} Connect to a network and rerun, put torchvision's {name} files in "
                            f"{download_dir}, or use data.source: imagefolder with data.path pointing at an image "
                            "folder or archive (train/<class>/, test/<class>/)") from None
    raise DataError(f"unknown data source {source!r}")


def source_sha256(path: str | Path, known: Mapping[Path, str] | None = None) -> str:
    """sha256 of a file, or of a directory's visible files: their relative paths and sha256s, sorted.

    Hidden files and folders (names starting with '.') are left out, as image folders ignore them.
    `known`: sha256s already computed (file path -> digest), used instead of reading those files again.
    """
    path = Path(path)
    known = known or {}
    if not path.is_dir():
        return known.get(path) or sha256_file(path)
    lines = []
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        lines += [f"{(Path(folder) / f).relative_to(path).as_posix()}\0"
                  f"{known.get(Path(folder) / f) or sha256_file(Path(folder) / f)}\n"
                  for f in files if not f.startswith(".")]
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def _open_auto(path: Path, download_dir: Path, name: str, resize: tuple[int, int] | None) -> dict[str, SplitSource]:
    """The image folder or archive at `path` when it exists, else torchvision's `name` in `download_dir`."""
    if path.exists():  # whatever data.name says: the name alone never switches the data
        return _open_imagefolder(path, resize)
    if name not in TORCHVISION_CLASSES:
        raise DataError(f"{path}: data.path does not exist, and data.name = {name!r} is not a torchvision dataset "
                        f"({', '.join(TORCHVISION_CLASSES)}) that could be downloaded instead: point data.path "
                        "at an image folder or archive with train/<class>/ and test/<class>/")
    try:
        return _open_torchvision(name, download_dir)
    except DownloadFailed as err:
        offline = " (for CIFAR-10, the team's offline archive cifar10-jpeg.tar.gz)" if name == "cifar10" else ""
        raise DataError(
            f"no {name} data: data.path {path} does not exist, and {err} Provide the data in one of two ways: "
            f"(1) put an image folder or archive with train/<class>/ and test/<class>/ at data.path{offline}, or "
            f"point data.path at one; (2) connect to a network once, so that torchvision downloads {name} "
            f"(checksums verified) into data.download_dir ({download_dir}), or copy torchvision's {name} files "
            "there. Then rerun."
        ) from None


# --------------------------------------------------------------------------------------------
# Image folders: train/<class>/<file> and test/<class>/<file>, in a directory or a tar archive.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFormat:
    """What every image must look like: size (W, H) and PIL mode, or the size to resize to."""

    size: tuple[int, int]
    mode: str
    resize: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size[1], self.size[0], 1 if self.mode == "L" else 3)


def decode_image(data: bytes, name: str, fmt: ImageFormat | None) -> tuple[np.ndarray, ImageFormat]:
    """Decode one image file; reject (naming the file) any whose size or mode differs from `fmt`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if fmt is None:
                if img.mode not in ("RGB", "L"):
                    raise DataError(f"{name}: image mode {img.mode} is not supported: use RGB or grayscale "
                                    "images, or set data.resize to convert every image to RGB")
                fmt = ImageFormat(img.size, img.mode, resize=False)
            if fmt.resize:
                img = img.convert("RGB")
                if img.size != fmt.size:
                    img = img.resize(fmt.size, Image.Resampling.BICUBIC)
            elif img.size != fmt.size or img.mode != fmt.mode:
                raise DataError(f"{name}: image is {img.size[0]}x{img.size[1]} {img.mode}, expected "
                                f"{fmt.size[0]}x{fmt.size[1]} {fmt.mode} like the first image; "
                                "set data.resize: [height, width] to resize and convert instead")
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{name}: unreadable or corrupt image ({err})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return array, fmt


@dataclass(frozen=True)
class _Entry:
    split: str
    class_name: str
    name: str  # file name inside the directory / member name inside the archive


def _open_imagefolder(path: Path, resize: tuple[int, int] | None) -> dict[str, SplitSource]:
    if not path.exists():
        raise DataError(f"{path}: data.path does not exist. Point data.path at an image folder or archive "
                        "with train/<class>/ and test/<class>/, or use data.source: torchvision (see README)")
    if path.is_dir():
        entries, class_dirs = _list_directory(path)
        open_bytes = _directory_reader()
    elif tarfile.is_tarfile(path):
        entries, class_dirs, open_bytes = _list_archive(path)
    else:
        raise DataError(f"{path}: not a directory or a .tar/.tar.gz archive")
    description = {"kind": "imagefolder", "path": str(path), "sha256": source_sha256(path)}
    classes = _check_classes(path, entries, class_dirs)
    fmt = ImageFormat((resize[1], resize[0]), "RGB", resize=True) if resize else None
    splits = {}
    for split in SPLITS:
        items = sorted((e for e in entries if e.split == split), key=lambda e: (classes.index(e.class_name), e.name))
        if split == "train" and fmt is None:
            fmt = decode_image(next(open_bytes(items[:1]))[1], items[0].name, None)[1]
        splits[split] = SplitSource(
            labels=np.array([classes.index(e.class_name) for e in items], dtype=np.int64),
            classes=classes,
            image_shape=fmt.shape,
            read=_folder_reader(items, open_bytes, fmt),
            ordered=False,
            description={**description, "split": split},
        )
    return splits


def _folder_reader(items: list[_Entry], open_bytes, fmt: ImageFormat):
    def read(indices: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for index, (entry, data) in zip(indices, open_bytes([items[i] for i in indices]), strict=True):
            yield int(index), decode_image(data, entry.name, fmt)[0]

    return read


def _split_class_file(parts: tuple[str, ...]) -> tuple[str, str, str] | None:
    """('…', 'train', 'cat', '0001.jpg') -> ('train', 'cat', root) when it is an image-folder entry."""
    if len(parts) >= 3 and parts[-3] in SPLITS and not parts[-1].startswith("."):
        return parts[-3], parts[-2], "/".join(parts[:-3])
    return None


def _list_directory(path: Path) -> tuple[list[_Entry], set[tuple[str, str]]]:
    entries, class_dirs = [], set()
    for split in SPLITS:
        split_dir = path / split
        if not split_dir.is_dir():
            raise DataError(f"{path}: no {split}/ directory: an image folder needs train/<class>/ and "
                            "test/<class>/")
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            class_dirs.add((split, class_dir.name))
            entries += [_Entry(split, class_dir.name, str(f)) for f in sorted(class_dir.iterdir())
                        if f.is_file() and not f.name.startswith(".")]
    return entries, class_dirs


def _directory_reader():
    def open_bytes(items: list[_Entry]) -> Iterator[tuple[_Entry, bytes]]:
        for entry in items:
            try:
                yield entry, Path(entry.name).read_bytes()
            except OSError as err:
                raise DataError(f"{entry.name}: cannot read ({err.strerror})") from None

    return open_bytes


def _list_archive(path: Path):
    try:
        with tarfile.open(path) as archive:
            members = archive.getmembers()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path}: corrupt or truncated archive ({err})") from None
    entries, class_dirs, roots, order = [], set(), set(), {}
    for position, member in enumerate(members):
        parts = PurePosixPath(member.name).parts
        if member.isdir() and len(parts) >= 2 and parts[-2] in SPLITS:
            class_dirs.add((parts[-2], parts[-1]))
            roots.add("/".join(parts[:-2]))
        elif member.isfile() and (found := _split_class_file(parts)):
            split, class_name, root = found
            entries.append(_Entry(split, class_name, member.name))
            class_dirs.add((split, class_name))
            roots.add(root)
            order[member.name] = position
    if len(roots) > 1:
        raise DataError(f"{path}: train/ and test/ appear under several folders ({', '.join(sorted(roots))}); "
                        "the archive must hold exactly one image folder")
    for split in SPLITS:
        if not any(s == split for s, _ in class_dirs):
            raise DataError(f"{path}: archive has no {split}/<class>/ folders: an image-folder archive needs "
                            "train/<class>/* and test/<class>/*")

    def open_bytes(items: list[_Entry]) -> Iterator[tuple[_Entry, bytes]]:
        """Yield the items' bytes in the order given, which must be archive order (one forward pass)."""
        positions = [order[e.name] for e in items]
        if positions != sorted(positions):
            raise ValueError("archive items must be requested in archive order")
        pending = iter(items)
        wanted = next(pending, None)
        try:
            with tarfile.open(path) as archive:
                for member in archive:  # streaming: a compressed archive is cheap to read forwards only
                    if wanted is None:
                        return
                    if member.name == wanted.name:
                        yield wanted, archive.extractfile(member).read()
                        wanted = next(pending, None)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{path}: corrupt or truncated archive ({err})") from None
        if wanted is not None:
            raise DataError(f"{path}: {wanted.name} vanished from the archive while reading")

    return entries, class_dirs, open_bytes


def _check_classes(path: Path, entries: list[_Entry], class_dirs: set[tuple[str, str]]) -> tuple[str, ...]:
    by_split = {split: sorted(c for s, c in class_dirs if s == split) for split in SPLITS}
    if by_split["train"] != by_split["test"]:
        only_train = sorted(set(by_split["train"]) - set(by_split["test"]))
        only_test = sorted(set(by_split["test"]) - set(by_split["train"]))
        raise DataError(f"{path}: class folders differ between train/ and test/ "
                        f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'})")
    if not by_split["train"]:
        raise DataError(f"{path}: no class folders under train/")
    counts = {(e.split, e.class_name) for e in entries}
    for split in SPLITS:
        for class_name in by_split[split]:
            if (split, class_name) not in counts:
                raise DataError(f"{path}: class folder {split}/{class_name}/ holds no images")
    return tuple(by_split["train"])


# --------------------------------------------------------------------------------------------
# In-memory arrays: npz files and torchvision datasets.
# --------------------------------------------------------------------------------------------


def _array_split(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], description: dict,
                 origin: str) -> SplitSource:
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise DataError(f"{origin}: images must be uint8 N×H×W×C with C = 1 or 3, got {images.dtype} "
                        f"{images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{origin}: labels must be integers, one per image; got {labels.dtype} {labels.shape} "
                        f"for {len(images)} images")
    if len(labels) == 0:
        raise DataError(f"{origin}: holds no images")
    bad = (labels < 0) | (labels >= len(classes))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(f"{origin}: label {int(labels[first])} at index {first} is out of range "
                        f"[0, {len(classes)}) for classes {list(classes)}")

    def read(indices: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for index in indices:
            yield int(index), images[index]

    return SplitSource(labels.astype(np.int64), classes, tuple(images.shape[1:]), read, ordered=True,
                       description=description)


def _open_npz(path: Path, classes: tuple[str, ...] | None) -> dict[str, SplitSource]:
    splits = {}
    for split in SPLITS:
        file = path / f"{split}.npz"
        if not file.is_file():
            raise DataError(f"{file}: missing: an npz source is a directory with train.npz and test.npz, "
                            "each holding 'image' (N×H×W×C uint8) and 'label'")
        try:
            with np.load(file, allow_pickle=False) as arrays:
                missing = {"image", "label"} - set(arrays.files)
                if missing:
                    raise DataError(f"{file}: missing key(s) {sorted(missing)}; found {sorted(arrays.files)}")
                images, labels = arrays["image"], arrays["label"]
                names = tuple(str(c) for c in arrays["classes"]) if "classes" in arrays.files else classes
        except (OSError, ValueError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{file}: unreadable npz ({err})") from None
        names = names or tuple(str(i) for i in range(int(labels.max(initial=-1)) + 1))
        splits[split] = _array_split(images, labels, names, {"kind": "npz", "path": str(file),
                                                             "sha256": sha256_file(file), "split": split}, str(file))
    if splits["train"].classes != splits["test"].classes:
        raise DataError(f"{path}: train.npz and test.npz have different classes")
    return splits


class DownloadFailed(DataError):
    """torchvision's files are not in the download directory and could not be downloaded there."""


def _open_torchvision(name: str, root: Path) -> dict[str, SplitSource]:
    datasets = {split: _load_or_download(name, root, split) for split in SPLITS}
    # What prepare reads, fingerprinted: CIFAR's extracted folder (both splits), SVHN's file per split.
    files = {split: root / (dataset.split_list[split][1] if name == "svhn" else dataset.base_folder)
             for split, dataset in datasets.items()}
    digests = {path: source_sha256(path) for path in set(files.values())}
    return {split: _torchvision_split(name, root, split, dataset, files[split], digests[files[split]])
            for split, dataset in datasets.items()}


def _torchvision_dataset(name: str, root: Path, split: str, download: bool):
    """torchvision's dataset class for one split; it verifies every file against its own md5 table."""
    import torchvision.datasets as tvd

    dataset_class = getattr(tvd, TORCHVISION_CLASSES[name])
    if name == "svhn":
        return dataset_class(str(root), split=split, download=download)
    return dataset_class(str(root), train=split == "train", download=download)


def _load_or_download(name: str, root: Path, split: str):
    try:
        return _torchvision_dataset(name, root, split, download=False)
    except RuntimeError:  # missing, or failing torchvision's checksums: download once
        pass
    print(f"{root} holds no verified {name} {split} files: downloading them once with torchvision (checksums "
          "verified)", file=sys.stderr)
    try:
        with _removed_on_failure(root):
            return _torchvision_dataset(name, root, split, download=True)
    except Exception as err:  # urllib, socket, ssl, tarfile, and torchvision's checksum RuntimeError
        raise DownloadFailed(f"torchvision could not download {name} into {root} ({type(err).__name__}: "
                             f"{err}).") from None


@contextlib.contextmanager
def _removed_on_failure(root: Path) -> Iterator[None]:
    """Remove what a failed or interrupted download left behind: the folders it created for `root`, or else
    the new entries in `root`."""
    new_folder = next((p for p in reversed((root, *root.parents)) if not p.exists()), None)  # outermost missing
    before = set() if new_folder else set(root.iterdir())
    try:
        yield
    except BaseException:
        leftovers = [new_folder] if new_folder else set(root.iterdir()) - before if root.is_dir() else []
        for leftover in leftovers:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        raise


def _torchvision_split(name: str, root: Path, split: str, dataset, files: Path, sha256: str) -> SplitSource:
    if name == "svhn":
        images, labels, classes = dataset.data.transpose(0, 2, 3, 1), np.asarray(dataset.labels), tuple("0123456789")
    else:
        images, labels, classes = np.asarray(dataset.data), np.asarray(dataset.targets), tuple(dataset.classes)
    description = {"kind": "torchvision", "name": name, "path": str(files), "sha256": sha256, "split": split}
    return _array_split(np.ascontiguousarray(images), labels, classes, description, f"{root} ({name} {split})")
