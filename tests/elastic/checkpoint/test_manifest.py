from __future__ import annotations

import json

import pytest

from elastic.checkpoint import CheckpointCorrupt, Manifest


def _manifest(**overrides: object) -> Manifest:
    fields: dict = {
        "step": 100,
        "world_size": 4,
        "time_unix": 1700000000.5,
        "files": {".metadata": 120, "__0_0.distcp": 4096},
        "meta": {"data": {"position": 12800}, "fingerprint": "abc"},
    }
    fields.update(overrides)
    return Manifest(**fields)


def test_round_trip_preserves_every_field() -> None:
    manifest = _manifest(known_good=True)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert Manifest.from_json(manifest.to_json().encode()) == manifest


def test_size_bytes_is_the_sum_of_file_sizes() -> None:
    assert _manifest().size_bytes == 4216


def test_with_known_good_changes_only_the_flag() -> None:
    good = _manifest().with_known_good()
    assert good.known_good is True
    assert good.files == _manifest().files


@pytest.mark.parametrize(
    "text",
    ["", "{not json", "[1, 2]", "null", b"\xff\xfe"],
    ids=["empty", "truncated", "array", "null", "not-utf8"],
)
def test_unparseable_text_is_corrupt(text: str | bytes) -> None:
    with pytest.raises(CheckpointCorrupt):
        Manifest.from_json(text)


def test_missing_required_key_is_corrupt_and_named() -> None:
    data = json.loads(_manifest().to_json())
    del data["files"]
    with pytest.raises(CheckpointCorrupt, match="files"):
        Manifest.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("step", -1),
        ("step", "100"),
        ("world_size", 0),
        ("files", {"x": -5}),
        ("files", ["x"]),
        ("known_good", "yes"),
        ("format_version", 2),
        ("time_unix", None),
    ],
)
def test_invalid_field_is_corrupt(key: str, value: object) -> None:
    data = json.loads(_manifest().to_json())
    data[key] = value
    with pytest.raises(CheckpointCorrupt, match=key.split("_")[0]):
        Manifest.from_json(json.dumps(data))


def test_unknown_key_is_corrupt() -> None:
    data = json.loads(_manifest().to_json())
    data["surprise"] = 1
    with pytest.raises(CheckpointCorrupt, match="surprise"):
        Manifest.from_json(json.dumps(data))


def test_meta_that_is_not_json_cannot_be_serialised() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        _manifest(meta={"x": object()}).to_json()
    with pytest.raises(ValueError, match="not valid JSON"):
        _manifest(meta={"x": float("nan")}).to_json()
