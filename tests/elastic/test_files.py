"""Atomic local file replacement (elastic/files.py)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from elastic import files


def test_writes_the_bytes_creating_the_directory_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "manifest.json"
    files.replace_file(target, b"first")
    files.replace_file(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert os.listdir(target.parent) == ["manifest.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "index.json"
    files.replace_file(target, b"committed")

    def full_disk(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        files.replace_file(target, b"new content")
    assert target.read_bytes() == b"committed"
    assert os.listdir(tmp_path) == ["index.json"]


def test_concurrent_writers_never_mix_or_lose_a_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "heartbeat.json"
    payloads = [bytes([65 + i]) * (64 * 1024 + i) for i in range(8)]
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        try:
            for _ in range(20):
                files.replace_file(target, data)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert target.read_bytes() in payloads
    assert os.listdir(tmp_path) == ["heartbeat.json"]


@pytest.mark.parametrize("durable", [False, True])
def test_durable_fsyncs_the_file_and_then_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    synced: list[bool] = []  # per fsync: was it a directory?
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", spy)
    files.replace_file(tmp_path / "m.json", b"{}", durable=durable)
    assert synced == ([False, True] if durable else [])
