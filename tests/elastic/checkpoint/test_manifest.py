from __future__ import annotations

import json
from dataclasses import replace

import pytest

from elastic.checkpoint import CheckpointCorrupt, Manifest

KEY = b"0123456789abcdef0123456789abcdef"


def _manifest(**overrides: object) -> Manifest:
    fields: dict = {
        "step": 100,
        "world_size": 4,
        "time_unix": 1700000000.5,
        "files": {".metadata": 120, "__0_0.distcp": 4096},
        "blake3": {".metadata": "a" * 64, "__0_0.distcp": "0123456789" * 6 + "abcd"},
        "chunk_bytes": 1024,
        "chunks": {
            ".metadata": ["b" * 64],
            "__0_0.distcp": ["c" * 64, "d" * 64, "e" * 64, "f" * 64],
        },
        "meta": {"data": {"position": 12800}, "fingerprint": "abc"},
    }
    fields.update(overrides)
    return Manifest(**fields)


def test_round_trip_preserves_every_field() -> None:
    manifest = _manifest(known_good=True).signed(KEY)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert Manifest.from_json(manifest.to_json().encode()) == manifest
    assert manifest.format_version == 3 and manifest.signature is not None


def test_a_format_1_manifest_without_digests_still_parses() -> None:
    data = json.loads(_manifest().to_json())
    for key in ("blake3", "signature", "chunks", "chunk_bytes"):
        del data[key]
    data["format_version"] = 1
    manifest = Manifest.from_json(json.dumps(data))
    assert manifest.blake3 == {} and not manifest.has_digests


@pytest.mark.parametrize(
    "blake3",
    [{".metadata": "a" * 64}, {".metadata": "a" * 64, "__0_0.distcp": "A" * 64}],
    ids=["a-file-without-digest", "not-lower-hex"],
)
def test_format_2_needs_one_hex_digest_per_file(blake3: dict[str, str]) -> None:
    data = json.loads(_manifest().to_json())
    data["blake3"] = blake3
    with pytest.raises(CheckpointCorrupt, match="blake3"):
        Manifest.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"chunks": {".metadata": ["b" * 64]}}, "chunks"),
        ({"chunks": {".metadata": ["b" * 64], "__0_0.distcp": ["c" * 64] * 3}}, "chunks"),
        ({"chunks": {".metadata": ["b" * 64], "__0_0.distcp": ["C" * 64] * 4}}, "chunks"),
        ({"chunks": {".metadata": "b" * 64, "__0_0.distcp": ["c" * 64] * 4}}, "chunks"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"chunk_bytes": 2048}, "chunks"),  # 4096 bytes are 2 chunks of 2048, not 4
        ({"chunk_bytes": 2**31}, "chunk_bytes"),
        ({"format_version": 2}, "chunk"),  # chunks are format 3
    ],
    ids=[
        "a-file-without-chunks",
        "too-few",
        "not-lower-hex",
        "not-a-list",
        "no-chunk-size",
        "count-does-not-fit-size",
        "chunk-too-big",
        "in-format-2",
    ],
)
def test_format_3_needs_the_chunk_digests_that_fit_each_file(
    change: dict[str, object], key: str
) -> None:
    data = json.loads(_manifest().to_json())
    data.update(change)
    with pytest.raises(CheckpointCorrupt, match=key):
        Manifest.from_json(json.dumps(data))


def test_a_format_2_manifest_without_chunks_still_parses() -> None:
    data = json.loads(_manifest().to_json())
    del data["chunks"], data["chunk_bytes"]
    data["format_version"] = 2
    manifest = Manifest.from_json(json.dumps(data))
    assert manifest.has_digests and not manifest.has_chunks


def test_signature_holds_under_its_key_only_and_covers_every_field() -> None:
    signed = _manifest().signed(KEY)
    assert signed.signature_problem(KEY) is None
    assert "bad signature" in str(signed.signature_problem(b"another key, 16 bytes or more"))
    assert "unsigned" in str(_manifest().signature_problem(KEY))
    changes: list[dict[str, object]] = [
        {"step": 101},
        {"known_good": True},
        {"meta": {}},
        {"files": {}, "blake3": {}, "chunks": {}},
        {"chunks": {".metadata": ["0" * 64], "__0_0.distcp": ["c" * 64] * 4}},
    ]
    for change in changes:
        changed = replace(signed, **change)  # type: ignore[arg-type]
        assert "bad signature" in str(changed.signature_problem(KEY)), change


def test_payload_is_compact_sorted_json_without_the_signature() -> None:
    signed = _manifest().signed(KEY)
    payload = json.loads(signed.payload())
    assert "signature" not in payload and payload["step"] == 100
    assert signed.payload() == _manifest().payload()
    assert signed.payload() == json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def test_size_bytes_is_the_sum_of_file_sizes() -> None:
    assert _manifest().size_bytes == 4216


def test_with_known_good_changes_only_the_flag_and_drops_the_signature() -> None:
    good = _manifest().signed(KEY).with_known_good()
    assert good.known_good is True and good.signature is None
    assert good.files == _manifest().files and good.blake3 == _manifest().blake3


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
        ("format_version", 4),
        ("signature", "not hex"),
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
