"""Data sources: image folders (directory and archive), npz, torchvision's CIFAR files and `auto`, and the errors
users meet."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dmat.data.sources import DataError, open_source, source_sha256
from tests.conftest import TINY_CLASSES, class_image, encode_png, make_archive
from tests.torchvision_files import LAYOUTS, NO_NETWORK, apply_checksums, fixture_images, write_cifar


def _read_all(split) -> np.ndarray:
    return np.stack([image for _, image in split.read(np.arange(len(split.labels)))])


@pytest.mark.parametrize("kind", ["directory", "archive"])
def test_image_folder_lists_labels_and_decodes(kind: str, image_folder: Path, image_archive: Path) -> None:
    splits = open_source("imagefolder", image_folder if kind == "directory" else image_archive, name="tiny")
    train = splits["train"]
    assert train.classes == TINY_CLASSES and train.image_shape == (8, 8, 3)
    assert np.array_equal(np.bincount(train.labels), [12, 12, 12])
    images = _read_all(train)
    np.testing.assert_array_equal(images[12], class_image(1, 0))  # sorted by class, then file name
    assert not train.ordered


def test_archive_reads_subsets_in_one_forward_pass(image_archive: Path) -> None:
    split = open_source("imagefolder", image_archive, name="tiny")["test"]
    wanted = np.array([1, 6, 11])
    got = list(split.read(wanted))
    assert [i for i, _ in got] == [1, 6, 11]
    np.testing.assert_array_equal(got[1][1], class_image(1, 2))


def _break(folder: Path, how: str) -> None:
    if how == "no_test":
        shutil.rmtree(folder / "test")
    elif how == "class_mismatch":
        (folder / "test" / "cherry").rename(folder / "test" / "date")
    elif how == "corrupt":
        (folder / "train" / "apple" / "0003.png").write_bytes(b"\x89PNG not really")
    elif how == "empty_class":
        for f in (folder / "train" / "banana").iterdir():
            f.unlink()
    elif how == "wrong_size":
        (folder / "train" / "apple" / "0005.png").write_bytes(encode_png(class_image(0, 5, size=9)))


ERRORS = {
    "no_test": "no test/",
    "class_mismatch": "class folders differ",
    "corrupt": "0003.png: unreadable or corrupt image",
    "empty_class": "train/banana/ holds no images",
    "wrong_size": "0005.png: image is 9x9 RGB, expected 8x8 RGB",
}


@pytest.mark.parametrize("kind", ["directory", "archive"])
@pytest.mark.parametrize("how", list(ERRORS))
def test_bad_image_folders_name_the_problem(tmp_path: Path, image_folder: Path, kind: str, how: str) -> None:
    _break(image_folder, how)
    path = image_folder if kind == "directory" else make_archive(image_folder, tmp_path / "broken.tar.gz")
    with pytest.raises(DataError, match=ERRORS[how].replace("(", r"\(")):
        for split in open_source("imagefolder", path, name="tiny").values():
            _read_all(split)


def test_resize_converts_odd_images(image_folder: Path) -> None:
    _break(image_folder, "wrong_size")
    train = open_source("imagefolder", image_folder, name="tiny", resize=(6, 7))["train"]
    assert train.image_shape == (6, 7, 3) and _read_all(train).shape == (36, 6, 7, 3)


def test_missing_path_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*torchvision"):
        open_source("imagefolder", tmp_path / "nowhere.tar.gz", name="x")


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "x.tar.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a directory or a .tar"):
        open_source("imagefolder", tmp_path / "x.tar.gz", name="x")


def _write_npz(folder: Path, labels_train: np.ndarray, **extra) -> Path:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for split, labels in (("train", labels_train), ("test", np.array([0, 1]))):
        images = rng.integers(0, 256, (len(labels), 4, 4, 3), dtype=np.uint8)
        np.savez(folder / f"{split}.npz", image=images, label=labels, **extra)
    return folder


def test_npz_source_with_class_names(tmp_path: Path) -> None:
    folder = _write_npz(tmp_path / "npz", np.array([0, 1, 1, 0]), classes=np.array(["x", "y"]))
    splits = open_source("npz", folder, name="toy")
    assert splits["train"].classes == ("x", "y") and splits["train"].ordered
    assert _read_all(splits["train"]).shape == (4, 4, 4, 3)


def test_npz_labels_out_of_range(tmp_path: Path) -> None:
    folder = _write_npz(tmp_path / "npz", np.array([0, 1, 5]))
    with pytest.raises(DataError, match=r"train.npz: label 5 at index 2 is out of range \[0, 3\)"):
        open_source("npz", folder, name="toy", classes=("a", "b", "c"))


def test_npz_missing_key(tmp_path: Path) -> None:
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "train.npz", images=np.zeros((1, 2, 2, 3), np.uint8), label=np.zeros(1))
    with pytest.raises(DataError, match=r"train.npz: missing key\(s\) \['image'\]"):
        open_source("npz", folder, name="toy")


def test_directory_sources_are_fingerprinted_by_content(image_folder: Path) -> None:
    before = open_source("imagefolder", image_folder, name="tiny")["train"].description["sha256"]
    assert before == source_sha256(image_folder)
    (image_folder / ".cache").write_bytes(b"hidden files are not data")
    assert source_sha256(image_folder) == before
    (image_folder / "test" / "apple" / "0001.png").write_bytes(encode_png(class_image(2, 9)))
    assert source_sha256(image_folder) != before


# torchvision's CIFAR files, read through its own dataset classes with the checksum table pointed at the fixture.


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails at once (an unreachable proxy): these tests never touch the network."""
    for key, value in NO_NETWORK.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_reads_its_cifar_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None,
                                            name: str) -> None:
    apply_checksums(write_cifar(tmp_path / "downloads", name, train_per_class=3, test_per_class=2), monkeypatch)
    splits = open_source("torchvision", tmp_path / "nowhere", name=name, download_dir=tmp_path / "downloads")
    n_classes = 100 if name == "cifar100" else 10
    train, test = splits["train"], splits["test"]
    assert (len(train.labels), len(test.labels)) == (3 * n_classes, 2 * n_classes)
    assert train.classes == test.classes == tuple(f"class{c:03d}" for c in range(n_classes))
    assert train.image_shape == (32, 32, 3) and train.ordered
    expected, labels = fixture_images(3 * n_classes, n_classes, 0)
    np.testing.assert_array_equal(_read_all(train), expected)  # torchvision order, HWC, pixel for pixel
    assert train.labels.tolist() == labels
    folder = tmp_path / "downloads" / LAYOUTS[name][1]
    assert train.description == {"kind": "torchvision", "name": name, "path": str(folder),
                                 "sha256": source_sha256(folder), "split": "train"}


def test_torchvision_download_branch_extracts_the_verified_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   offline: None) -> None:
    """Only the archive a download leaves is there: torchvision finds it verified, extracts and checks it."""
    downloads = tmp_path / "downloads"
    apply_checksums(write_cifar(downloads, "cifar10", 2, 1, archived=True), monkeypatch)
    splits = open_source("torchvision", tmp_path / "nowhere", name="cifar10", download_dir=downloads)
    assert len(splits["train"].labels) == 20 and (downloads / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_torchvision_rejects_files_failing_its_checksums(tmp_path: Path, offline: None,
                                                         capsys: pytest.CaptureFixture) -> None:
    """The real checksum table: fixture files fail it, the download cannot replace them, nothing is left behind."""
    downloads = tmp_path / "downloads"
    write_cifar(downloads, "cifar10", 1, 1)
    before = sorted(downloads.rglob("*"))
    with pytest.raises(DataError, match=r"torchvision could not download cifar10 into .*Connect to a network"):
        open_source("torchvision", tmp_path / "nowhere", name="cifar10", download_dir=downloads)
    assert sorted(downloads.rglob("*")) == before
    assert "downloading them once with torchvision" in capsys.readouterr().err


def test_auto_uses_the_image_folder_when_it_exists(tmp_path: Path, image_archive: Path) -> None:
    splits = open_source("auto", image_archive, name="cifar10", download_dir=tmp_path / "downloads")
    assert splits["test"].description["kind"] == "imagefolder" and splits["train"].classes == TINY_CLASSES
    assert not (tmp_path / "downloads").exists()


def test_auto_falls_back_to_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None) -> None:
    apply_checksums(write_cifar(tmp_path / "downloads", "cifar10", 2, 1), monkeypatch)
    splits = open_source("auto", tmp_path / "cifar10-jpeg.tar.gz", name="cifar10", download_dir=tmp_path / "downloads")
    assert splits["train"].description["kind"] == "torchvision" and len(splits["test"].labels) == 10


def test_auto_without_either_names_both_ways_and_writes_nothing(tmp_path: Path, offline: None) -> None:
    downloads = tmp_path / "data" / "downloads"
    with pytest.raises(DataError) as raised:
        open_source("auto", tmp_path / "cifar10-jpeg.tar.gz", name="cifar10", download_dir=downloads)
    message = str(raised.value)
    assert "cifar10-jpeg.tar.gz does not exist" in message and "URLError" in message
    assert "at data.path" in message and f"into data.download_dir ({downloads})" in message
    assert not (tmp_path / "data").exists()


def test_auto_cannot_download_a_dataset_torchvision_does_not_have(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.name = 'tiny' is not a torchvision dataset"):
        open_source("auto", tmp_path / "nowhere", name="tiny", download_dir=tmp_path / "downloads")
