"""Typed records between stages: written and read back unchanged; data of another shape is refused with a message
that names the file and the key."""

from __future__ import annotations

import json

import pytest

from dmat.artifacts.records import MixedStoreRef, MixManifest, RealStoreRef, RecordError, from_json, to_json


def manifest() -> MixManifest:
    return MixManifest(
        real=RealStoreRef(path="data/real/train", sha256="a" * 64, images=90, class_counts={"red": 45, "blue": 45}),
        source="generated",
        synthetic=MixedStoreRef(path="data/synthetic", sha256="b" * 64, images=40, used=20,
                                class_counts_used={"red": 10, "blue": 10}),
        synthetic_fraction=0.5, synthetic_limit=None, seed=3, classes=("red", "blue"),
        indices_file="indices.npy", indices_sha256="c" * 64)


def test_a_manifest_survives_json_unchanged() -> None:
    data = json.loads(json.dumps(to_json(manifest())))
    assert data["classes"] == ["red", "blue"] and data["synthetic_limit"] is None
    assert from_json(MixManifest, data, "manifest.json") == manifest()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("seed"), "manifest.json: missing seed"),
    (lambda d: d["synthetic"].pop("used"), "manifest.json: missing synthetic.used"),
    (lambda d: d.update(seed="3"), "manifest.json: seed = '3' is not of type int"),
    (lambda d: d.update(seed=True), "manifest.json: seed = True is not of type int"),
    (lambda d: d.update(classes="red"), "manifest.json: classes is not a list"),
    (lambda d: d.update(real=[1]), "manifest.json: real. is not a mapping"),
])
def test_a_manifest_of_another_shape_names_the_file_and_the_key(edit, message: str) -> None:
    data = to_json(manifest())
    edit(data)
    with pytest.raises(RecordError, match=message.replace(".", r"\.").replace("(", r"\(")):
        from_json(MixManifest, data, "manifest.json")


def test_an_integer_where_a_float_belongs_is_read_as_a_float() -> None:
    data = {**to_json(manifest()), "synthetic_fraction": 1}
    fraction = from_json(MixManifest, data, "m").synthetic_fraction
    assert fraction == 1.0 and isinstance(fraction, float)
