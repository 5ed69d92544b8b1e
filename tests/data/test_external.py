"""External generated data streamed into a store: the reference's .npz layout (one file or parts), other stores and
image folders give exactly what loading them whole and sorting by class gives, with every source file's sha256."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dmat.data.external import ExternalSet, HashingFile, fingerprint
from dmat.data.sources import source_sha256
from dmat.data.store import ArrayStore, write_store
from dmat.errors import DataError
from dmat.files import sha256_file
from tests.conftest import encode_png

CLASSES = ("a", "b", "c")
SHAPE = (4, 4, 3)


def generated(n: int, seed: int, sorted_by_class: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    return rng.integers(0, 256, size=(n, *SHAPE), dtype=np.uint8), np.sort(labels) if sorted_by_class else labels


def convert(paths: list[Path], out: Path, rows: int = 7) -> tuple[ArrayStore, dict]:
    out.mkdir()
    record = ExternalSet(paths, CLASSES, SHAPE, rows=rows).write(out)
    return ArrayStore.open(out, verify=True), record


def test_one_npz_in_the_reference_layout_becomes_the_store_np_load_gives(tmp_path: Path) -> None:
    images, labels = generated(50, seed=0, sorted_by_class=True)  # as the reference's files: sorted by class
    np.savez(tmp_path / "1m.npz", image=images, label=labels)
    store, record = convert([tmp_path / "1m.npz"], tmp_path / "store")
    with np.load(tmp_path / "1m.npz") as direct:
        np.testing.assert_array_equal(store.images, direct["image"])
        np.testing.assert_array_equal(store.labels, direct["label"])
    assert record["kind"] == "external" and record["format"] == "npz" and record["images"] == 50
    assert record["files"] == [{"path": str(tmp_path / "1m.npz"), "sha256": sha256_file(tmp_path / "1m.npz"),
                                "size": (tmp_path / "1m.npz").stat().st_size, "images": 50}]
    assert store.meta.source == record


def test_parts_are_concatenated_in_order_and_sorted_by_class_stably(tmp_path: Path) -> None:
    """Three parts (one deflated, one with big-endian int32 labels) in chunks that split classes: the store is the
    concatenation, stably sorted by class, as `merge-data.py` followed by a class sort would give."""
    parts = [generated(n, seed) for seed, n in enumerate((23, 40, 1))]
    paths = [tmp_path / f"part{i}.npz" for i in range(3)]
    np.savez(paths[0], image=parts[0][0], label=parts[0][1])
    np.savez_compressed(paths[1], image=parts[1][0], label=parts[1][1].astype(">i4"))
    np.savez(paths[2], label=parts[2][1], image=parts[2][0])  # members in the other order
    store, record = convert(paths, tmp_path / "store", rows=5)
    images, labels = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    order = np.argsort(labels, kind="stable")
    np.testing.assert_array_equal(store.images, images[order])
    np.testing.assert_array_equal(store.labels, labels[order])
    assert [f["sha256"] for f in record["files"]] == [sha256_file(p) for p in paths]
    assert [f["images"] for f in record["files"]] == [23, 40, 1]
    assert store.meta.class_counts == tuple(int(c) for c in np.bincount(labels, minlength=3))


def test_a_file_is_hashed_while_it_is_read_even_with_seeks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(10_000))
    with HashingFile(path) as f:
        f.seek(9_000)
        f.read(500)  # beyond what is hashed: hashed at the end
        f.seek(0)
        f.read(4_000)
        f.seek(2_000)
        f.read(3_000)  # overlaps what is hashed already
        assert f.sha256() == sha256_file(path)


def test_another_store_and_an_image_folder_are_sources_too(tmp_path: Path) -> None:
    images, labels = generated(20, seed=3)
    write_store(tmp_path / "other", images, labels, CLASSES, {"kind": "test"})
    store, record = convert([tmp_path / "other"], tmp_path / "from-store")
    order = np.argsort(labels, kind="stable")
    np.testing.assert_array_equal(store.images, images[order])
    assert record["format"] == "store" and record["files"][0]["sha256"] == source_sha256(tmp_path / "other")
    folder = tmp_path / "folder"
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / "train" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        (folder / "train" / CLASSES[label] / f"{i:03d}.png").write_bytes(encode_png(image))
    store, record = convert([folder], tmp_path / "from-folder")
    np.testing.assert_array_equal(store.images, images[order])  # file names sort like the indices
    assert record["format"] == "imagefolder" and record["files"][0]["sha256"] == source_sha256(folder)


def test_image_folder_classes_must_be_the_datasets(tmp_path: Path) -> None:
    (tmp_path / "folder" / "zebra").mkdir(parents=True)
    (tmp_path / "folder" / "zebra" / "0.png").write_bytes(encode_png(np.zeros(SHAPE, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"folder: class folders \['zebra'\] are not among the dataset's classes"):
        ExternalSet([tmp_path / "folder"], CLASSES, SHAPE)


def test_fortran_ordered_arrays_are_refused_not_misread(tmp_path: Path) -> None:
    images, labels = generated(5, seed=4)
    np.savez(tmp_path / "f.npz", image=np.asfortranarray(images), label=labels)
    with pytest.raises(DataError, match=r"f\.npz \('image'\): stored in Fortran order"):
        ExternalSet([tmp_path / "f.npz"], CLASSES, SHAPE)


def test_a_fingerprint_changes_with_the_file_or_the_folder(tmp_path: Path) -> None:
    images, labels = generated(5, seed=5)
    np.savez(tmp_path / "g.npz", image=images, label=labels)
    before = fingerprint(tmp_path / "g.npz")
    assert fingerprint(tmp_path / "g.npz") == before
    np.savez(tmp_path / "g.npz", image=images[:4], label=labels[:4])
    assert fingerprint(tmp_path / "g.npz") != before
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.png").write_bytes(b"1")
    folder = fingerprint(tmp_path / "folder")
    (tmp_path / "folder" / "y.png").write_bytes(b"2")
    assert fingerprint(tmp_path / "folder")["files"] == folder["files"] + 1


def test_a_damaged_image_member_is_found_while_streaming(tmp_path: Path) -> None:
    """A flipped byte inside a stored member passes every header check; the zip's CRC-32 catches it at the end."""
    images, labels = generated(400, seed=6)  # 19 kB: more than zipfile reads with the header
    path = tmp_path / "bad.npz"
    np.savez(path, image=images, label=labels)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("image.npy")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 10_000] ^= 0xFF  # inside the array data
    path.write_bytes(bytes(data))
    external = ExternalSet([path], CLASSES, SHAPE)  # headers and labels are fine
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match=r"bad\.npz \('image'\): damaged data \(Bad CRC-32"):
        external.write(tmp_path / "out")
