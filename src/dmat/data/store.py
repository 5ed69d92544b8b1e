"""The canonical array store (docs/method.md): every dataset the pipeline writes.

A store is a directory holding
  images.npy  uint8, N×H×W×C, always opened memory-mapped,
  labels.npy  int64, N,
  meta.json   class names, shape, per-class counts, source, sha256 of both array files.

Writers fill a pre-allocated memory-mapped file and publish the directory with one rename, so a
reader sees either the previous store or the complete new one, and millions of images never need
to sit in RAM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmat.errors import StoreError
from dmat.files import atomic_path, sha256_file

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StoreMeta:
    classes: tuple[str, ...]
    shape: tuple[int, int, int, int]  # N, H, W, C
    class_counts: tuple[int, ...]
    source: dict[str, Any]
    images_sha256: str
    labels_sha256: str

    @property
    def digest(self) -> str:
        """One sha256 for the store: it changes when either array file changes."""
        return hashlib.sha256(f"{self.images_sha256}:{self.labels_sha256}".encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "classes": list(self.classes),
            "shape": list(self.shape),
            "class_counts": dict(zip(self.classes, self.class_counts, strict=True)),
            "source": self.source,
            "sha256": {"images": self.images_sha256, "labels": self.labels_sha256, "store": self.digest},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreMeta:
        classes = tuple(data["classes"])
        return cls(
            classes=classes,
            shape=tuple(int(v) for v in data["shape"]),  # type: ignore[arg-type]
            class_counts=tuple(int(data["class_counts"][c]) for c in classes),
            source=dict(data["source"]),
            images_sha256=str(data["sha256"]["images"]),
            labels_sha256=str(data["sha256"]["labels"]),
        )


class ArrayStore:
    """A read-only view of a canonical store; `images` is memory-mapped."""

    def __init__(self, path: Path, images: np.ndarray, labels: np.ndarray, meta: StoreMeta):
        self.path = path
        self.images = images
        self.labels = labels
        self.meta = meta

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = False) -> ArrayStore:
        """Open a store, checking its files agree with meta.json; `verify` also re-hashes both arrays."""
        path = Path(path)
        meta = _read_meta(path)
        images = _load_array(path / IMAGES_FILE, np.uint8, 4)
        labels = _load_array(path / LABELS_FILE, np.int64, 1)
        if images.shape != meta.shape or labels.shape[0] != images.shape[0]:
            raise StoreError(f"{path}: images {images.shape} and labels {labels.shape} do not match "
                             f"meta.json shape {meta.shape}")
        if verify:
            for name, expected in ((IMAGES_FILE, meta.images_sha256), (LABELS_FILE, meta.labels_sha256)):
                if sha256_file(path / name) != expected:
                    raise StoreError(f"{path / name}: sha256 differs from meta.json: the file is corrupt "
                                     "or was changed after it was written")
        return cls(path, images, labels, meta)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def classes(self) -> tuple[str, ...]:
        return self.meta.classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta.shape[1:])  # type: ignore[return-value]

    @property
    def digest(self) -> str:
        return self.meta.digest

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copy the given rows (any order, repeats allowed) into fresh arrays: (images, labels).

        Rows are read with pread, not through the memory map: touching a mapping faults in whole
        neighbourhoods of pages that then count as the process's memory, so random access over a
        huge generated store would grow RSS towards the store's size.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: rows must lie in [0, {len(self)}), got [{rows.min()}, {rows.max()}]")
        return _pread_rows(self.images, rows), _pread_rows(self.labels, rows)


def _pread_rows(array: np.memmap, rows: np.ndarray) -> np.ndarray:
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    row_bytes = out.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    with open(array.filename, "rb", buffering=0) as f:
        fd = f.fileno()
        for i in np.argsort(rows, kind="stable"):  # ascending offsets: friendly to the disk and page cache
            os.preadv(fd, [memoryview(out[i:i + 1]).cast("B")], array.offset + int(rows[i]) * row_bytes)
    return out


def _read_meta(path: Path) -> StoreMeta:
    if not path.is_dir():
        raise StoreError(f"{path}: store directory not found")
    try:
        return StoreMeta.from_json(json.loads((path / META_FILE).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise StoreError(f"{path / META_FILE}: missing: not a canonical store") from None
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{path / META_FILE}: unreadable store metadata ({err!r})") from None


def _load_array(file: Path, dtype: type, ndim: int) -> np.ndarray:
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise StoreError(f"{file}: missing") from None
    except (ValueError, OSError) as err:
        raise StoreError(f"{file}: not a readable .npy array ({err})") from None
    if array.dtype != dtype or array.ndim != ndim:
        raise StoreError(f"{file}: expected {np.dtype(dtype).name} with {ndim} dimensions, "
                         f"found {array.dtype} with shape {array.shape}")
    return array


def allocate_store(directory: Path, size: int, image_shape: Sequence[int]) -> None:
    """Pre-allocate a store's two array files (zeros), for writers that fill rows in place (e.g. several
    processes at once), then `seal_store` it."""
    for name, dtype, shape in ((IMAGES_FILE, np.uint8, (size, *image_shape)), (LABELS_FILE, np.int64, (size,))):
        np.lib.format.open_memmap(directory / name, mode="w+", dtype=dtype, shape=shape).flush()


def write_block(directory: Path, start: int, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a contiguous block of rows into a pre-allocated store with pwrite, not a memory map:
    pages written through a mapping stay resident, so a huge store would grow the writer's RSS."""
    with BlockWriter(directory) as writer:
        writer.write(start, images, labels)


class BlockWriter:
    """`write_block` for many blocks: both array files opened, and their headers read, once."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._files = {}
        for name in (IMAGES_FILE, LABELS_FILE):
            target = np.load(directory / name, mmap_mode="r")  # reads the header: offset, dtype, shape
            self._files[name] = (os.open(directory / name, os.O_WRONLY), target.dtype, target.shape, target.offset)
            del target

    def write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        for name, block in ((IMAGES_FILE, images), (LABELS_FILE, labels)):
            fd, dtype, shape, offset = self._files[name]
            if block.dtype != dtype or block.shape[1:] != shape[1:] or start + len(block) > shape[0]:
                raise ValueError(f"{self.dir / name}: a block of {block.dtype} {block.shape} at row {start} does not "
                                 f"fit {dtype} {shape}")
            row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
            os.pwrite(fd, np.ascontiguousarray(block).tobytes(), offset + start * row_bytes)

    def close(self) -> None:
        for fd, *_ in self._files.values():
            os.close(fd)
        self._files = {}

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def seal_store(directory: Path, classes: Sequence[str], source: dict[str, Any]) -> StoreMeta:
    """Write meta.json for filled array files: shape, per-class counts and the sha256 of both files."""
    images = _load_array(directory / IMAGES_FILE, np.uint8, 4)
    labels = _load_array(directory / LABELS_FILE, np.int64, 1)
    counts = np.zeros(len(classes), dtype=np.int64)
    # Chunks read from the file, not through the memory map, whose touched pages would stay in RSS: the labels of
    # a huge store stay out of RAM.
    with open(directory / LABELS_FILE, "rb") as f:
        f.seek(labels.offset)
        for _ in range(0, len(labels), 1 << 20):
            chunk = np.fromfile(f, dtype=np.int64, count=1 << 20)
            if len(chunk) and (chunk.min() < 0 or chunk.max() >= len(classes)):
                raise ValueError(f"{directory}: labels must lie in [0, {len(classes)})")
            counts += np.bincount(chunk, minlength=len(classes))
    meta = StoreMeta(
        classes=tuple(classes),
        shape=tuple(images.shape),  # type: ignore[arg-type]
        class_counts=tuple(int(c) for c in counts),
        source=source,
        images_sha256=sha256_file(directory / IMAGES_FILE),
        labels_sha256=sha256_file(directory / LABELS_FILE),
    )
    del images, labels
    (directory / META_FILE).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


class StoreWriter:
    """Fill a new store in `directory` block by block, then `finish()` it (hashes and meta.json)."""

    def __init__(self, directory: Path, size: int, image_shape: Sequence[int], classes: Sequence[str]):
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C), got {tuple(image_shape)}")
        self.dir = directory
        self.classes = tuple(classes)
        allocate_store(directory, size, image_shape)
        self.images = np.load(directory / IMAGES_FILE, mmap_mode="r+")
        self.labels = np.load(directory / LABELS_FILE, mmap_mode="r+")
        self._written = np.zeros(size, dtype=bool)

    def write(self, rows: slice | np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        """Write images (uint8 N×H×W×C) and their labels into `rows` (a slice or an index array)."""
        rows = np.arange(len(self.labels))[rows] if isinstance(rows, slice) else np.asarray(rows)
        if images.dtype != np.uint8 or images.shape[1:] != self.images.shape[1:]:
            expected = ", ".join(map(str, self.images.shape[1:]))
            raise ValueError(f"images must be uint8 with shape (N, {expected}), got {images.dtype} {images.shape}")
        if not len(rows) == len(images) == len(labels):
            raise ValueError(f"{len(rows)} rows, {len(images)} images and {len(labels)} labels do not match")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}), got [{labels.min()}, {labels.max()}]")
        self.images[rows] = images
        self.labels[rows] = labels
        self._written[rows] = True

    def finish(self, source: dict[str, Any]) -> StoreMeta:
        missing = np.flatnonzero(~self._written)
        if len(missing):
            raise ValueError(f"{len(missing)} rows of the store were never written (first: {missing[0]})")
        self.images.flush()
        self.labels.flush()
        del self.images, self.labels  # close the memory maps before hashing and renaming
        return seal_store(self.dir, self.classes, source)


@contextlib.contextmanager
def create_store(path: str | Path, size: int, image_shape: Sequence[int], classes: Sequence[str],
                 source: dict[str, Any]) -> Iterator[StoreWriter]:
    """Context manager: yields a writer; on a clean exit the finished store replaces `path`."""
    with atomic_path(path, directory=True) as tmp:
        writer = StoreWriter(tmp, size, image_shape, classes)
        yield writer
        writer.finish(source)


def write_store(path: str | Path, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                source: dict[str, Any], *, chunk: int = 4096) -> ArrayStore:
    """Write in-memory (or memory-mapped) arrays as a store, chunk by chunk."""
    with create_store(path, len(images), images.shape[1:], classes, source) as writer:
        for start in range(0, len(images), chunk):
            block = slice(start, min(start + chunk, len(images)))
            writer.write(block, np.asarray(images[block]), np.asarray(labels[block]))
    return ArrayStore.open(path)
