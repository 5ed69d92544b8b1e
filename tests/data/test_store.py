"""The canonical array store: round trip, memory mapping, integrity, atomic publication."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dmat.data.store import ArrayStore, StoreError, create_store, write_store
from dmat.files import sha256_file

CLASSES = ("a", "b", "c")


def _arrays(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 4, 5, 3), dtype=np.uint8), np.arange(n, dtype=np.int64) % 3


def test_round_trip_is_memory_mapped_with_full_meta(tmp_path: Path) -> None:
    images, labels = _arrays()
    store = write_store(tmp_path / "s", images, labels, CLASSES, {"kind": "test"}, chunk=3)
    assert isinstance(store.images, np.memmap)
    np.testing.assert_array_equal(store.images, images)
    np.testing.assert_array_equal(store.labels, labels)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["shape"] == [10, 4, 5, 3] and meta["classes"] == list(CLASSES)
    assert meta["class_counts"] == {"a": 4, "b": 3, "c": 3}
    assert meta["sha256"]["images"] == sha256_file(tmp_path / "s" / "images.npy")
    assert meta["source"] == {"kind": "test"}


def test_same_data_same_bytes(tmp_path: Path) -> None:
    images, labels = _arrays()
    first = write_store(tmp_path / "one", images, labels, CLASSES, {})
    second = write_store(tmp_path / "two", images, labels, CLASSES, {})
    assert first.digest == second.digest
    for name in ("images.npy", "labels.npy", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_failed_write_leaves_nothing_and_keeps_old_store(tmp_path: Path) -> None:
    images, labels = _arrays()
    old = write_store(tmp_path / "s", images, labels, CLASSES, {})
    with pytest.raises(RuntimeError), create_store(tmp_path / "s", 10, (4, 5, 3), CLASSES, {}) as writer:
        writer.write(slice(0, 2), images[:2], labels[:2])
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert ArrayStore.open(tmp_path / "s", verify=True).digest == old.digest


def test_unwritten_rows_are_refused(tmp_path: Path) -> None:
    images, labels = _arrays()
    with pytest.raises(ValueError, match="never written"), \
            create_store(tmp_path / "s", 10, (4, 5, 3), CLASSES, {}) as writer:
        writer.write(slice(0, 5), images[:5], labels[:5])
    assert not (tmp_path / "s").exists()


def test_writer_rejects_wrong_shape_and_labels(tmp_path: Path) -> None:
    images, labels = _arrays()
    with create_store(tmp_path / "s", 10, (4, 5, 3), CLASSES, {}) as writer:
        with pytest.raises(ValueError, match="uint8 with shape"):
            writer.write(slice(0, 2), images[:2, :, :4], labels[:2])
        with pytest.raises(ValueError, match="labels must lie"):
            writer.write(slice(0, 2), images[:2], np.array([0, 3]))
        writer.write(np.arange(10)[::-1], images, labels)


def test_verify_detects_corruption(tmp_path: Path) -> None:
    images, labels = _arrays()
    write_store(tmp_path / "s", images, labels, CLASSES, {})
    data = bytearray((tmp_path / "s" / "images.npy").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "s" / "images.npy").write_bytes(bytes(data))
    ArrayStore.open(tmp_path / "s")  # cheap open only checks structure
    with pytest.raises(StoreError, match="sha256 differs"):
        ArrayStore.open(tmp_path / "s", verify=True)


@pytest.mark.parametrize("broken", ["missing_dir", "missing_meta", "bad_meta", "wrong_dtype", "short_labels"])
def test_broken_store_errors_name_the_file(tmp_path: Path, broken: str) -> None:
    images, labels = _arrays()
    path = tmp_path / "s"
    write_store(path, images, labels, CLASSES, {})
    if broken == "missing_dir":
        path = tmp_path / "nope"
    elif broken == "missing_meta":
        (path / "meta.json").unlink()
    elif broken == "bad_meta":
        (path / "meta.json").write_text("{not json")
    elif broken == "wrong_dtype":
        np.save(path / "images.npy", images.astype(np.float32))
    elif broken == "short_labels":
        np.save(path / "labels.npy", labels[:5])
    with pytest.raises(StoreError, match=str(tmp_path)):
        ArrayStore.open(path)


def test_empty_store(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s", np.zeros((0, 2, 2, 3), np.uint8), np.zeros(0, np.int64), CLASSES, {})
    assert len(store) == 0 and store.meta.class_counts == (0, 0, 0)
