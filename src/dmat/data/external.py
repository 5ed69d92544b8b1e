"""Generated images made outside the pipeline, streamed into a class-sorted canonical store.

Three kinds of source (`generate.source: external`, docs/published.md):
- `.npz` files in the layout of Wang et al. 2023's published EDM sets: an `image` array (uint8,
  N×H×W×C) and a `label` array (integers, one per image). Several files are parts of one set,
  concatenated in the order given, never in memory;
- an image folder, `<class>/<file>` or `train/<class>/<file>`, its class folders named like the
  dataset's classes;
- another DMAT store directory.

Memory stays constant whatever the set's size: `np.load` would read an `.npz` member whole, so the
members are read as streams instead (the `.npy` header, then the array's bytes chunk by chunk;
`zipfile` streams stored and deflated members alike). The store is sorted by class (stably: each
class keeps its images in source order), as generate's own stores are, in two passes: the labels
first, to count each class and so know where its rows start, then images and labels together, every
chunk's rows written straight to their places. Each file's sha256 is computed while it is read (one
pass over the big image data), and the store's metadata records every source file's path, size and
sha256, so lineage reaches the downloaded file. Every file is checked (keys, dtypes, shapes, label
range, image size) before the store is allocated; a bad file raises DataError naming it and the
problem. The caller publishes the store atomically (`dmat.files.atomic_path`).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from tqdm import tqdm

from dmat.data.sources import decode_image, source_sha256
from dmat.data.store import (
    IMAGES_FILE,
    LABELS_FILE,
    META_FILE,
    ArrayStore,
    BlockWriter,
    allocate_store,
    seal_store,
)
from dmat.errors import DataError, StoreError

NPZ_IMAGES, NPZ_LABELS = "image", "label"  # the reference's array names
ROWS_PER_CHUNK = 8192  # 24 MiB of 32×32×3 images per read
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class HashingFile(io.RawIOBase):
    """A file opened for reading whose sha256 builds up as it is read, even with seeks in between.

    Bytes count towards the hash when a read reaches the first byte not hashed yet; `sha256()` reads
    whatever was skipped (for an `.npz`, the small label member and the zip directory at the end). So a
    file read front to back, as `zipfile` reads a member, is hashed without a second pass.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._position = 0
        self._hashed = 0
        self._digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = self._file.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        self._file.seek(self._position)
        data = self._file.read(size)
        end = self._position + len(data)
        if self._position <= self._hashed < end:
            self._digest.update(memoryview(data)[self._hashed - self._position:])
            self._hashed = end
        self._position = end
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def sha256(self) -> str:
        """The whole file's sha256, reading only what was not hashed yet."""
        self._file.seek(self._hashed)
        while chunk := self._file.read(1 << 22):
            self._digest.update(chunk)
            self._hashed += len(chunk)
        return self._digest.hexdigest()

    def close(self) -> None:
        self._file.close()
        super().close()


class NpyStream:
    """An `.npy` array read front to back: its header, then its rows in chunks."""

    def __init__(self, stream: BinaryIO, where: str):
        self.stream, self.where = stream, where
        try:
            version = np.lib.format.read_magic(stream)
            if version not in _HEADER_READERS:
                raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
            shape, fortran_order, self.dtype = _HEADER_READERS[version](stream)
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise DataError(f"{where}: not a readable .npy array ({err})") from None
        self.shape = tuple(int(n) for n in shape)
        if self.dtype.hasobject:
            raise DataError(f"{where}: holds Python objects (dtype {self.dtype}); expected numbers")
        if fortran_order and len(self.shape) > 1:
            raise DataError(f"{where}: stored in Fortran order, which cannot be read row by row; save the array "
                            "in C order (numpy's default)")

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """The array in blocks of `rows` rows (native byte order), then a check that nothing follows."""
        row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        for start in range(0, len(self), rows):
            count = min(rows, len(self) - start)
            data = self._read(count * row_bytes)
            yield np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:]).astype(
                self.dtype.newbyteorder("="), copy=False)
        if self._read_some(1):
            raise DataError(f"{self.where}: holds more bytes than its header's shape {self.shape} says")

    def _read(self, size: int) -> bytes:
        data = self._read_some(size)
        if len(data) != size:
            raise DataError(f"{self.where}: ends early (truncated file?): {len(data)} of {size} bytes read")
        return data

    def _read_some(self, size: int) -> bytes:
        try:
            return self.stream.read(size)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:  # a bad CRC-32, a torn deflate stream
            raise DataError(f"{self.where}: damaged data ({err}); download the file again") from None


class Source(Protocol):
    """One source of images: checked on opening, then read in two passes: its labels, then images and labels."""

    kind: str  # npz, store or imagefolder
    path: Path
    size: int  # images

    def label_chunks(self, rows: int) -> Iterator[np.ndarray]: ...

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def record(self) -> dict[str, Any]: ...


class NpzSource:
    """An `.npz` file with `image` and `label` arrays (np.savez or np.savez_compressed)."""

    kind = "npz"

    def __init__(self, path: Path, classes: Sequence[str], image_shape: tuple[int, int, int]):
        self.path = path
        self.file = HashingFile(path)
        try:
            self.archive = zipfile.ZipFile(self.file)
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            self.file.close()
            raise DataError(f"{path}: not a readable .npz (zip) file ({err}): truncated or damaged? Download it "
                            "again") from None
        found = sorted(name.removesuffix(".npy") for name in self.archive.namelist())
        missing = [key for key in (NPZ_IMAGES, NPZ_LABELS) if key not in found]
        if missing:
            raise DataError(f"{path}: no {' and no '.join(repr(k) for k in missing)} array (it holds "
                            f"{', '.join(map(repr, found)) or 'nothing'}); expected {NPZ_IMAGES!r} (uint8 N×H×W×C) "
                            f"and {NPZ_LABELS!r} (integers, one per image)")
        images, labels = self._open(NPZ_IMAGES), self._open(NPZ_LABELS)
        with images.stream, labels.stream:
            check_arrays(str(path), images, labels, image_shape)
        self.size = len(images)

    def _open(self, key: str) -> NpyStream:
        where = f"{self.path} ({key!r})"
        try:
            return NpyStream(self.archive.open(f"{key}.npy"), where)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
            raise DataError(f"{where}: damaged member ({err}); download the file again") from None

    def label_chunks(self, rows: int) -> Iterator[np.ndarray]:
        labels = self._open(NPZ_LABELS)
        with labels.stream:
            yield from labels.chunks(rows)

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        images, labels = self._open(NPZ_IMAGES), self._open(NPZ_LABELS)
        with images.stream, labels.stream:
            yield from zip(images.chunks(rows), labels.chunks(rows), strict=True)

    def record(self) -> dict[str, Any]:
        record = {"path": str(self.path), "sha256": self.file.sha256(), "size": self.path.stat().st_size,
                  "images": self.size}
        self.archive.close()
        self.file.close()
        return record


class StoreSource:
    """Another DMAT store: its arrays read as streams; images.npy's sha256 checked against its meta.json."""

    kind = "store"

    def __init__(self, path: Path, classes: Sequence[str], image_shape: tuple[int, int, int]):
        self.path = path
        try:
            store = ArrayStore.open(path)
        except StoreError as err:
            raise DataError(str(err)) from None
        if tuple(store.classes) != tuple(classes):
            raise DataError(f"{path}: classes {list(store.classes)} differ from the dataset's {list(classes)}")
        self.meta, self.size = store.meta, len(store)
        self.images_file = HashingFile(path / IMAGES_FILE)
        with open(path / LABELS_FILE, "rb") as labels:
            check_arrays(str(path), self._images(), NpyStream(labels, str(path / LABELS_FILE)), image_shape)

    def _images(self) -> NpyStream:
        self.images_file.seek(0)
        return NpyStream(self.images_file, str(self.path / IMAGES_FILE))

    def label_chunks(self, rows: int) -> Iterator[np.ndarray]:
        with open(self.path / LABELS_FILE, "rb") as labels:
            yield from NpyStream(labels, str(self.path / LABELS_FILE)).chunks(rows)

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with open(self.path / LABELS_FILE, "rb") as labels:
            yield from zip(self._images().chunks(rows), NpyStream(labels, str(self.path / LABELS_FILE)).chunks(rows),
                           strict=True)

    def record(self) -> dict[str, Any]:
        images_sha256 = self.images_file.sha256()
        self.images_file.close()
        if images_sha256 != self.meta.images_sha256:
            raise DataError(f"{self.path / IMAGES_FILE}: sha256 differs from its {META_FILE}: the store is corrupt "
                            "or was changed after it was written")
        files = [p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")]
        return {"path": str(self.path), "images": self.size, "store_sha256": self.meta.digest,
                "sha256": source_sha256(self.path, known={self.path / IMAGES_FILE: images_sha256}),
                "size": sum(p.stat().st_size for p in files)}


class FolderSource:
    """An image folder: `<class>/<file>` or `train/<class>/<file>`; images decoded in class order."""

    kind = "imagefolder"

    def __init__(self, path: Path, classes: Sequence[str], image_shape: tuple[int, int, int]):
        self.path, self.image_shape = path, image_shape
        root = path / "train" if (path / "train").is_dir() else path
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [name for name in folders if name not in classes]
        if unknown or not folders:
            raise DataError(f"{root}: class folders {unknown or '(none)'} are not among the dataset's classes "
                            f"{list(classes)}; an image folder holds <class>/<image> or train/<class>/<image>")
        self.files = [(label, file) for label, name in enumerate(classes) if (root / name).is_dir()
                      for file in sorted((root / name).iterdir()) if file.is_file() and not file.name.startswith(".")]
        if not self.files:
            raise DataError(f"{root}: the class folders hold no images")
        self.labels = np.array([label for label, _ in self.files], dtype=np.int64)
        self.size = len(self.files)
        self.sha256 = source_sha256(path)  # read before decoding: the digest is of what is decoded next

    def label_chunks(self, rows: int) -> Iterator[np.ndarray]:
        yield self.labels

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.size, rows):
            block = self.files[start:start + rows]
            yield np.stack([self._decode(file) for _, file in block]), self.labels[start:start + len(block)]

    def _decode(self, file: Path) -> np.ndarray:
        try:
            data = file.read_bytes()
        except OSError as err:
            raise DataError(f"{file}: cannot read ({err.strerror})") from None
        image, found = decode_image(data, str(file), None)
        if image.shape != self.image_shape:
            height, width, channels = self.image_shape
            raise DataError(f"{file}: image is {found.size[0]}x{found.size[1]} {found.mode}, the dataset's images are "
                            f"{width}x{height} with {channels} channel(s)")
        return image

    def record(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "images": self.size,
                "size": sum(file.stat().st_size for _, file in self.files)}


def check_arrays(where: str, images: NpyStream, labels: NpyStream, image_shape: tuple[int, int, int]) -> None:
    """Shapes and dtypes of an image array and its labels, against the dataset's image shape."""
    if images.dtype != np.uint8 or len(images.shape) != 4:
        raise DataError(f"{images.where}: expected uint8 images N×H×W×C, found {images.dtype} with shape "
                        f"{images.shape}")
    if images.shape[1:] != tuple(image_shape):
        raise DataError(f"{images.where}: images are {'×'.join(map(str, images.shape[1:]))} (H×W×C), the dataset's "
                        f"are {'×'.join(map(str, image_shape))}")
    if labels.dtype.kind not in "iu" or len(labels.shape) != 1:
        raise DataError(f"{labels.where}: expected integer labels, one per image, found {labels.dtype} with shape "
                        f"{labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{where}: {len(labels)} labels for {len(images)} images")


def open_sources(paths: Sequence[Path], classes: Sequence[str], image_shape: tuple[int, int, int]) -> list[Source]:
    """Open and check every source: several `.npz` parts, or one folder (a DMAT store or an image folder)."""
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: not found (generate.external)")
    if len(paths) == 1 and paths[0].is_dir():
        kind = StoreSource if (paths[0] / META_FILE).is_file() else FolderSource
        return [kind(paths[0], classes, image_shape)]
    wrong = [path for path in paths if path.is_dir() or path.suffix != ".npz"]
    if wrong:
        raise DataError(f"{wrong[0]}: expected an .npz file: several sources are the parts of one set in .npz "
                        "files; an image folder or a DMAT store is given alone")
    return [NpzSource(path, classes, image_shape) for path in paths]


def class_counts(sources: Sequence[Source], num_classes: int, rows: int) -> np.ndarray:
    """Images per class over every source (the first pass), every label checked against the class count."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for source in sources:
        seen = 0
        for labels in source.label_chunks(rows):
            bad = (labels < 0) | (labels >= num_classes)
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                raise DataError(f"{source.path}: label {int(labels[first])} at index {seen + first} is out of range "
                                f"[0, {num_classes}) for the dataset's {num_classes} classes")
            counts += np.bincount(labels.astype(np.int64), minlength=num_classes)
            seen += len(labels)
    return counts


class ExternalSet:
    """The sources of one generated set, every file checked and every label counted (the first pass), ready to be
    written as a class-sorted store."""

    def __init__(self, paths: Sequence[Path], classes: Sequence[str], image_shape: tuple[int, int, int], *,
                 rows: int = ROWS_PER_CHUNK):
        self.paths, self.classes, self.image_shape, self.rows = list(paths), tuple(classes), image_shape, rows
        self.sources = open_sources(self.paths, classes, image_shape)
        self.counts = class_counts(self.sources, len(classes), rows)
        if self.counts.sum() == 0:
            raise DataError(f"{', '.join(map(str, paths))}: no images")

    def __len__(self) -> int:
        return int(self.counts.sum())

    def write(self, directory: Path, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Fill `directory` (an existing empty folder) with the class-sorted store (the second pass); returns the
        source record sealed into its meta.json: kind, format, and per file its path, size, sha256 and images."""
        next_row = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        allocate_store(directory, len(self), self.image_shape)
        with (tqdm(total=len(self), desc="external", unit="img", mininterval=2) as progress,
              BlockWriter(directory) as writer):
            for source in self.sources:
                for images, labels in source.chunks(self.rows):
                    write_sorted(writer, images, labels.astype(np.int64), next_row)
                    progress.update(len(labels))
        record = {"kind": "external", "format": self.sources[0].kind, "images": len(self),
                  "files": [source.record() for source in self.sources], **(extra or {})}
        seal_store(directory, self.classes, record)
        return record


def write_sorted(writer: BlockWriter, images: np.ndarray, labels: np.ndarray, next_row: np.ndarray) -> None:
    """Write a chunk's images class by class at each class's next free row (advancing it): a stable class sort."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    present, starts = np.unique(sorted_labels, return_index=True)
    for c, start, end in zip(present, starts, [*starts[1:], len(order)], strict=True):
        writer.write(int(next_row[c]), images[order[start:end]], sorted_labels[start:end])
        next_row[c] += end - start


def fingerprint(path: Path) -> dict[str, Any]:
    """What changes when a source file or folder changes, from the file system alone (sizes and modification
    times, as DVC itself decides whether to re-hash a file): cheap enough to take before every run."""
    if not path.exists():
        raise DataError(f"{path}: not found (generate.external)")
    if path.is_file():
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    entries, size = [], 0
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in (f for f in files if not f.startswith(".")):
            stat = (Path(folder) / name).stat()
            size += stat.st_size
            entries.append(f"{(Path(folder) / name).relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}")
    listing = hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()
    return {"path": str(path), "files": len(entries), "size": size, "listing_sha256": listing}

