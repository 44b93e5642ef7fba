"""Early disk writeback of checkpoint shard files (elastic/checkpoint/writeback.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from elastic.checkpoint import writeback
from tests.elastic.checkpoint.conftest import Backend, assert_states_equal, blank_like

MiB = 1024 * 1024


def _record(monkeypatch: pytest.MonkeyPatch, answer: bool = True) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []

    def fake(fd: int, offset_bytes: int, length_bytes: int) -> bool:
        calls.append((offset_bytes, length_bytes))
        return answer

    monkeypatch.setattr(writeback, "start_writeback", fake)
    return calls


def test_requests_cover_the_written_bytes_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record(monkeypatch)
    path = tmp_path / "shard"
    with path.open("wb") as raw:
        raw.write(b"h" * 100)  # written before wrapping: not ours to start
        fh = writeback.WritebackFile(raw, chunk_bytes=MiB)
        for _ in range(5):
            assert fh.write(b"x" * (MiB // 2 + 7)) == MiB // 2 + 7
        assert fh.tell() == 100 + 5 * (MiB // 2 + 7)
    chunk = MiB // 2 + 7
    assert calls == [(100, 2 * chunk), (100 + 2 * chunk, 2 * chunk)]
    assert path.stat().st_size == 100 + 5 * chunk  # the tail is left to the caller's fsync


def test_a_refused_request_is_not_repeated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record(monkeypatch, answer=False)
    with (tmp_path / "shard").open("wb") as raw:
        fh = writeback.WritebackFile(raw, chunk_bytes=1024)
        for _ in range(10):
            fh.write(b"y" * 1024)
    assert len(calls) == 1
    assert (tmp_path / "shard").read_bytes() == b"y" * 10 * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_kernel_accepts_a_request_on_a_real_file(tmp_path: Path) -> None:
    with (tmp_path / "shard").open("wb") as raw:
        raw.write(b"z" * 3 * MiB)
        raw.flush()
        assert writeback.start_writeback(raw.fileno(), 0, 3 * MiB)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names files by /proc/self/fd")
def test_local_checkpoint_saves_go_through_writeback(
    local: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    started_bytes: dict[str, int] = {}  # shard file -> end of the last range asked for

    def fake(fd: int, offset_bytes: int, length_bytes: int) -> bool:
        name = os.readlink(f"/proc/self/fd/{fd}")
        assert offset_bytes == started_bytes.get(name, 0)  # contiguous, in order
        started_bytes[name] = offset_bytes + length_bytes
        return True

    monkeypatch.setattr(writeback, "start_writeback", fake)
    state = {"model": {k: torch.rand(6, MiB) for k in ("a", "b", "c", "d")}}  # 4 x 24 MiB
    manager = local.manager()
    manager.save(1, state, meta={})
    shards = {str(p): p.stat().st_size for p in Path(local.url[7:]).rglob("*.distcp")}
    assert set(started_bytes) == set(shards)
    for name, size in shards.items():  # all but a tail, which the final fsync writes
        assert size - writeback.WRITEBACK_BYTES < started_bytes[name] <= size
    got = blank_like(state)
    manager.load(got, step=1)
    assert_states_equal(got, state)
