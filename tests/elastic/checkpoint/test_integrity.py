"""Digests and signatures: a changed byte or a planted file is refused before it is deserialised.

The planted files are real pickles that create a marker file when unpickled: the marker's
absence proves nothing of the checkpoint reached ``pickle.load`` (DCP reads ``.metadata`` with
it); each test also unpickles its payload at the end to prove the payload would have fired.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch

from elastic.checkpoint import CheckpointCorrupt, CheckpointManager, Storage, dcp_io, integrity
from elastic.checkpoint.manifest import Manifest
from tests.elastic.checkpoint.conftest import Backend, assert_states_equal, blank_like, toy_state


class _Plant:
    """Unpickling this opens ``marker`` for writing, creating the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _planted(marker: Path, size_bytes: int) -> bytes:
    """A pickle that creates ``marker``, padded to ``size_bytes`` (pickle stops at STOP)."""
    payload = pickle.dumps(_Plant(marker))
    assert len(payload) <= size_bytes
    return payload + b"\0" * (size_bytes - len(payload))


def _fires(planted: bytes, marker: Path) -> bool:
    pickle.loads(planted)  # the control: this payload does create the marker
    return marker.exists()


def _key_file(tmp_path: Path, name: str = "key", key: str = "k" * 32) -> str:
    path = tmp_path / name
    path.write_text(key + "\n")
    return str(path)


def _manifest_json(storage: Storage, step: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(storage.read_bytes(f"run/step-{step}/manifest.json"))
    return data


def _write_manifest(storage: Storage, step: int, data: dict[str, Any]) -> None:
    storage.write_bytes(f"run/step-{step}/manifest.json", json.dumps(data).encode())


def _fallbacks(log_lines: Any) -> list[dict[str, Any]]:
    return [x for x in log_lines() if x["event"] == "checkpoint_fallback"]


def _two_steps(manager: CheckpointManager) -> None:
    manager.save(1, toy_state(1), meta={})
    manager.save(2, toy_state(2), meta={})


def _loads_step_1(manager: CheckpointManager) -> None:
    got = blank_like(toy_state(0))
    used = manager.load(got)
    assert used is not None and used.step == 1
    assert_states_equal(got, toy_state(1))


# ------------------------------------------------------------------------------- digests
def test_manifest_lists_the_sha256_of_every_file_as_stored(backend: Backend) -> None:
    manager = backend.manager()
    manager.save(5, toy_state(5), meta={})
    (manifest,) = manager.list()
    storage = backend.storage()
    assert manifest.format_version == 3 and set(manifest.blake3) == set(manifest.files)
    assert set(manifest.chunks) == set(manifest.files) and manifest.chunk_bytes > 0
    for name, digest in manifest.blake3.items():
        data = storage.read_bytes(f"run/step-5/{name}")
        assert blake3.blake3(data).hexdigest() == digest
        step = manifest.chunk_bytes
        chunks = [blake3.blake3(data[i : i + step]).hexdigest() for i in range(0, len(data), step)]
        assert manifest.chunks[name] == chunks
    assert manifest.signature is None  # no key configured
    assert manager.verify(manifest, contents=True) == []


def test_a_flipped_byte_in_a_shard_falls_back_naming_the_file_and_digest_mismatch(
    backend: Backend, log_lines: Any
) -> None:
    manager = backend.manager()
    _two_steps(manager)
    storage = backend.storage()
    shard = max((n for n in storage.sizes("run/step-2") if n.endswith(".distcp")), key=len)
    data = bytearray(storage.read_bytes(f"run/step-2/{shard}"))
    data[len(data) // 2] ^= 0x01  # same size: the listing sees nothing wrong
    storage.write_bytes(f"run/step-2/{shard}", bytes(data))
    step_2 = manager.list()[-1]
    assert manager.verify(step_2) == []
    assert manager.verify(step_2, contents=True) == [f"{shard}: digest mismatch"]
    log_lines()  # drop the save lines

    _loads_step_1(manager)

    (line,) = _fallbacks(log_lines)
    assert line["step"] == 2 and line["file"] == shard
    assert line["problem"].startswith(f"{shard}: digest mismatch")
    assert storage.sizes("run/step-2")[shard] == len(data)  # nothing deleted or rewritten
    assert [m.step for m in manager.list()] == [1, 2]


def test_a_planted_metadata_pickle_is_never_unpickled(
    local: Backend, log_lines: Any, tmp_path: Path
) -> None:
    manager = local.manager()
    _two_steps(manager)
    storage = local.storage()
    marker = tmp_path / "pwned"
    planted = _planted(marker, storage.sizes("run/step-2")[".metadata"])
    storage.write_bytes("run/step-2/.metadata", planted)
    # DCP falls back to a rank-local metadata file when .metadata fails: plant that too.
    storage.write_bytes("run/step-2/__0.metadata", planted)

    _loads_step_1(manager)

    assert not marker.exists()
    (line,) = _fallbacks(log_lines)
    assert line["file"] == ".metadata" and "digest mismatch" in line["problem"]
    assert _fires(planted, marker)


def test_a_format_1_manifest_loads_by_size_with_a_warning_line(
    local: Backend, log_lines: Any
) -> None:
    manager = local.manager()
    _two_steps(manager)
    storage = local.storage()
    for step in (1, 2):
        data = _manifest_json(storage, step)
        del data["blake3"], data["signature"], data["chunks"], data["chunk_bytes"]
        _write_manifest(storage, step, {**data, "format_version": 1})
    # Same size, garbage bytes: without digests only DCP itself notices (in a read thread).
    size = storage.sizes("run/step-2")["__0_0.distcp"]
    storage.write_bytes("run/step-2/__0_0.distcp", b"\0" * size)

    _loads_step_1(manager)

    lines = log_lines()
    assert [x["step"] for x in lines if x["event"] == "checkpoint_unverified"] == [2, 1]
    (line,) = _fallbacks(log_lines)
    assert line["step"] == 2 and line["problem"].startswith("load failed")


# ------------------------------------------------------------------------------- signing
def test_with_a_key_every_manifest_is_signed_and_loads(local: Backend, tmp_path: Path) -> None:
    key_file = _key_file(tmp_path)
    manager = local.manager(signing_key_file=key_file)
    _two_steps(manager)
    manager.mark_known_good(1)  # a rewritten manifest is signed again
    manifests = manager.list()
    assert [m.step for m in manifests] == [1, 2] and manifests[0].known_good
    key = Path(key_file).read_bytes().strip()
    assert all(m.signature_problem(key) is None for m in manifests)
    got = blank_like(toy_state(0))
    assert manager.load(got).step == 2  # type: ignore[union-attr]
    assert_states_equal(got, toy_state(2))


def test_a_manager_without_a_key_loads_signed_checkpoints(local: Backend, tmp_path: Path) -> None:
    local.manager(signing_key_file=_key_file(tmp_path)).save(1, toy_state(1), meta={})
    _loads_step_1(local.manager())


@pytest.mark.parametrize(
    ("writer_key", "problem"),
    [(None, "unsigned"), ("another key, long enough", "bad signature")],
    ids=["written-without-a-key", "written-with-another-key"],
)
def test_a_checkpoint_not_signed_with_the_key_is_refused(
    local: Backend, log_lines: Any, tmp_path: Path, writer_key: str | None, problem: str
) -> None:
    key_file = _key_file(tmp_path)
    local.manager(signing_key_file=key_file).save(1, toy_state(1), meta={})
    other = _key_file(tmp_path, "other", writer_key) if writer_key else None
    local.manager(signing_key_file=other).save(2, toy_state(2), meta={})
    reader = local.manager(signing_key_file=key_file)
    log_lines()

    assert [m.step for m in reader.list()] == [1]
    _loads_step_1(reader)

    (line,) = _fallbacks(log_lines)
    assert line["step"] == 2 and line["file"] == "manifest.json"
    assert line["problem"].startswith(f"manifest.json: {problem}")


def test_when_no_checkpoint_is_signed_load_raises_instead_of_starting_over(
    local: Backend, tmp_path: Path
) -> None:
    local.manager().save(1, toy_state(1), meta={})
    reader = local.manager(signing_key_file=_key_file(tmp_path))
    with pytest.raises(CheckpointCorrupt, match=r"step 1: manifest\.json: unsigned"):
        reader.load(blank_like(toy_state(0)))
    assert local.storage().exists("run/step-1/manifest.json")  # refused, never deleted


@pytest.mark.parametrize("signature", ["dropped", "kept"])
def test_a_planted_metadata_with_a_matching_manifest_is_refused_unread(
    local: Backend, log_lines: Any, tmp_path: Path, signature: str
) -> None:
    # The writer without the key replaces .metadata and rewrites the manifest to match it.
    manager = local.manager(signing_key_file=_key_file(tmp_path))
    _two_steps(manager)
    storage = local.storage()
    marker = tmp_path / "pwned"
    planted = pickle.dumps(_Plant(marker))
    storage.write_bytes("run/step-2/.metadata", planted)
    data = _manifest_json(storage, 2)
    data["files"][".metadata"] = len(planted)
    data["blake3"][".metadata"] = blake3.blake3(planted).hexdigest()
    if signature == "dropped":
        data["signature"] = None
    _write_manifest(storage, 2, data)

    _loads_step_1(manager)

    assert not marker.exists()
    (line,) = _fallbacks(log_lines)
    assert line["file"] == "manifest.json"
    assert ("unsigned" if signature == "dropped" else "bad signature") in line["problem"]
    assert _fires(planted, marker)


BAD_SIGNATURE = "manifest.json: bad signature (written without this key, or changed since)"


def test_a_signed_manifest_with_a_changed_digest_is_refused(
    local: Backend, log_lines: Any, tmp_path: Path
) -> None:
    manager = local.manager(signing_key_file=_key_file(tmp_path))
    _two_steps(manager)
    storage = local.storage()
    data = _manifest_json(storage, 2)
    data["blake3"]["__0_0.distcp"] = "0" * 64
    _write_manifest(storage, 2, data)
    log_lines()

    _loads_step_1(manager)

    (line,) = _fallbacks(log_lines)
    assert line["step"] == 2 and line["problem"] == BAD_SIGNATURE


@pytest.mark.parametrize(
    ("claimed_step", "problem"),
    [(3, BAD_SIGNATURE), (1, "manifest.json: says step 1, in step-3")],
    ids=["step-changed", "step-kept"],
)
def test_a_signed_checkpoint_copied_to_a_newer_step_is_refused(
    local: Backend, log_lines: Any, tmp_path: Path, claimed_step: int, problem: str
) -> None:
    manager = local.manager(signing_key_file=_key_file(tmp_path), keep_last=3)
    _two_steps(manager)
    storage = local.storage()
    for name in storage.sizes("run/step-1"):
        storage.write_bytes(f"run/step-3/{name}", storage.read_bytes(f"run/step-1/{name}"))
    _write_manifest(storage, 3, {**_manifest_json(storage, 1), "step": claimed_step})
    log_lines()

    got = blank_like(toy_state(0))
    assert manager.load(got).step == 2  # type: ignore[union-attr]
    assert_states_equal(got, toy_state(2))

    (line,) = _fallbacks(log_lines)
    assert line["step"] == 3 and line["problem"] == problem


def test_refused_manifests_neither_count_for_retention_nor_get_deleted(
    local: Backend, tmp_path: Path
) -> None:
    key_file = _key_file(tmp_path)
    local.manager().save(90, toy_state(9), meta={})  # unsigned, newer than everything below
    manager = local.manager(signing_key_file=key_file, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, toy_state(step), meta={})
    assert [m.step for m in manager.list()] == [2, 3]
    assert local.storage().list_dir("run") == ["step-2", "step-3", "step-90"]


def test_a_manifest_parsed_as_json_only(local: Backend, tmp_path: Path) -> None:
    manager = local.manager()
    manager.save(1, toy_state(1), meta={})
    marker = tmp_path / "pwned"
    planted = pickle.dumps(_Plant(marker))
    local.storage().write_bytes("run/step-1/manifest.json", planted)
    assert manager.list() == []
    with pytest.raises(CheckpointCorrupt, match=r"manifest\.json: manifest is not valid JSON"):
        manager.load(blank_like(toy_state(0)))
    assert not marker.exists()


def test_manifest_round_trip_keeps_the_signature_valid(tmp_path: Path) -> None:
    key = b"k" * 32
    manifest = Manifest(
        step=1,
        world_size=1,
        time_unix=0.1 + 0.2,  # a float whose repr must survive the JSON round trip
        files={".metadata": 3},
        blake3={".metadata": "f" * 64},
        chunk_bytes=1024,
        chunks={".metadata": ["e" * 64]},
        meta={"unicode": "\u00e9\u4e2d", "nested": [1, 2.5, None, {"b": True}]},
    ).signed(key)
    assert Manifest.from_json(manifest.to_json()).signature_problem(key) is None


# ------------------------------------------------------------------ streamed, chunk by chunk
CHUNK_BYTES = 64 * 1024


def _big_state(seed: int) -> dict[str, Any]:
    """Tensors of several kinds, most larger than a (test-sized) chunk, and small ones."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(256, 384, generator=gen),
            "wt": torch.randn(384, 256, generator=gen).t(),  # saved non-contiguous
            "h": torch.randn(200, 300, generator=gen).to(torch.bfloat16),
            "ids": torch.randint(0, 1 << 40, (20_000,), generator=gen),
            "mask": torch.rand(70_000, generator=gen) > 0.5,
            "b": torch.randn(3, generator=gen),
        },
        "step": torch.tensor(seed),
    }


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Chunks of CHUNK_BYTES; the names of the files a load reads whole (not streamed)."""
    monkeypatch.setattr(integrity, "DIGEST_CHUNK_BYTES", CHUNK_BYTES)
    whole: list[str] = []
    real = dcp_io.read_verified

    def recording(stream: Any, *, name: str, **kwargs: Any) -> memoryview:
        whole.append(name)
        return real(stream, name=name, **kwargs)

    monkeypatch.setattr(dcp_io, "read_verified", recording)
    return whole


def test_a_load_streams_each_shard_a_checked_chunk_at_a_time_into_place(
    backend: Backend, small_chunks: list[str]
) -> None:
    manager = backend.manager()
    manager.save(1, _big_state(1), meta={})
    (manifest,) = manager.list()
    shards = [n for n in manifest.files if n.endswith(".distcp")]
    assert manifest.chunk_bytes == CHUNK_BYTES
    assert all(len(manifest.chunks[n]) > 3 for n in shards), manifest.chunks

    got = blank_like(_big_state(0))
    assert manager.load(got).step == 1  # type: ignore[union-attr]

    assert_states_equal(got, _big_state(1))
    assert small_chunks == [".metadata"]  # every shard streamed, none held whole


def test_a_flipped_byte_in_a_later_chunk_falls_back_naming_the_file_and_the_chunk(
    backend: Backend, log_lines: Any, small_chunks: list[str]
) -> None:
    manager = backend.manager()
    manager.save(1, _big_state(1), meta={})
    manager.save(2, _big_state(2), meta={})
    storage = backend.storage()
    shard = max((n for n in storage.sizes("run/step-2") if n.endswith(".distcp")), key=len)
    data = bytearray(storage.read_bytes(f"run/step-2/{shard}"))
    at = len(data) - 10  # the last chunk: earlier chunks were already copied into the state
    data[at] ^= 0x10
    storage.write_bytes(f"run/step-2/{shard}", bytes(data))
    log_lines()

    got = blank_like(_big_state(0))
    assert manager.load(got).step == 1  # type: ignore[union-attr]

    assert_states_equal(got, _big_state(1))  # the fallback filled every tensor again
    (line,) = _fallbacks(log_lines)
    assert line["step"] == 2 and line["file"] == shard
    chunk_start = at // CHUNK_BYTES * CHUNK_BYTES
    assert line["problem"].startswith(f"{shard}: digest mismatch (chunk at byte {chunk_start}:")


def test_a_format_2_manifest_still_loads_each_file_whole_and_checked(
    local: Backend, small_chunks: list[str], log_lines: Any
) -> None:
    manager = local.manager()
    manager.save(1, _big_state(1), meta={})
    storage = local.storage()
    data = _manifest_json(storage, 1)
    del data["chunks"], data["chunk_bytes"]
    _write_manifest(storage, 1, {**data, "format_version": 2})

    got = blank_like(_big_state(0))
    assert manager.load(got).step == 1  # type: ignore[union-attr]

    assert_states_equal(got, _big_state(1))
    assert sorted(small_chunks) == sorted(data["files"])  # .metadata and every shard whole
    assert not _fallbacks(log_lines)


def test_a_signed_manifest_with_a_changed_chunk_digest_is_refused(
    local: Backend, log_lines: Any, tmp_path: Path, small_chunks: list[str]
) -> None:
    manager = local.manager(signing_key_file=_key_file(tmp_path))
    manager.save(1, _big_state(1), meta={})
    manager.save(2, _big_state(2), meta={})
    storage = local.storage()
    data = _manifest_json(storage, 2)
    data["chunks"]["__0_0.distcp"][1] = "0" * 64
    _write_manifest(storage, 2, data)
    log_lines()

    got = blank_like(_big_state(0))
    assert manager.load(got).step == 1  # type: ignore[union-attr]

    (line,) = _fallbacks(log_lines)
    assert line["step"] == 2 and line["problem"] == BAD_SIGNATURE


def _chunk_digests(data: bytes, step: int) -> list[str]:
    return [blake3.blake3(data[i : i + step]).hexdigest() for i in range(0, len(data), step)]


def test_verified_chunks_yields_each_chunk_once_checked_and_the_writer_lists_the_same() -> None:
    data = bytes(range(256)) * 41  # 10,496 bytes: 10 chunks of 1,024 and one of 256
    written = integrity.DigestingFile(io.BytesIO())
    for at in range(0, len(data), 999):  # written in pieces that straddle the chunks
        written.write(data[at : at + 999])
    record = written.record()
    assert record.chunk_bytes == integrity.DIGEST_CHUNK_BYTES  # the default, 16 MiB
    hashed = integrity.hash_stream(io.BytesIO(data), chunk_bytes=1024)
    assert list(hashed.chunks) == _chunk_digests(data, 1024)

    got = [
        (offset, bytes(chunk))
        for offset, chunk in integrity.verified_chunks(
            io.BytesIO(data),
            name="f",
            size_bytes=len(data),
            chunk_bytes=1024,
            digests=_chunk_digests(data, 1024),
        )
    ]
    assert [o for o, _ in got] == list(range(0, len(data), 1024))
    assert b"".join(c for _, c in got) == data


LISTED = b"y" * 2048 + b"x" * 952  # a file of 3,000 bytes as the manifest lists it


@pytest.mark.parametrize(
    ("stored", "digests", "problem"),
    [
        (LISTED[:-1] + b"z", None, r"f: digest mismatch \(chunk at byte 2048: "),
        (LISTED[:2500], None, "f: 2500 bytes, manifest says 3000"),
        (LISTED + b"!", None, "f: longer than the 3000 bytes listed"),
        (LISTED, ["0" * 64] * 2, "f: 2 chunk digests listed for 3000 bytes"),
    ],
    ids=["changed-last-chunk", "short", "long", "wrong-count"],
)
def test_verified_chunks_refuses_a_changed_short_or_long_file_naming_it(
    stored: bytes, digests: list[str] | None, problem: str
) -> None:
    chunks = integrity.verified_chunks(
        io.BytesIO(stored),
        name="f",
        size_bytes=3000,
        chunk_bytes=1024,
        digests=digests or _chunk_digests(LISTED, 1024),
    )
    with pytest.raises(integrity.CheckpointUntrusted, match=problem) as caught:
        list(chunks)
    assert caught.value.file == "f"
