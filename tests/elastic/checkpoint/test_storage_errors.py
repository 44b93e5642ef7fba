"""Storage failing in the middle of a save: the error names the cause and the file, nothing
committed is lost, and the failed step is never committed.

Real failures, not mocks of our code: a tmpfs mounted small enough to fill during the second
save (needs root; skipped with the reason otherwise), and a moto_server S3 endpoint that
starts refusing the test's credentials after the first shard of a save is uploaded (moto's
own switch, ``/moto-api/reset-auth``: from then on it checks every request against IAM, which
knows no such key). One more test fails the writes of DCP's second write thread only (a fake
full disk under torch's file system), the case a real full disk hits only sometimes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint import _fsspec_filesystem

from elastic.checkpoint import CheckpointManager, StorageError
from tests.elastic.checkpoint.conftest import Backend, assert_states_equal, blank_like
from tests.support.s3 import S3Bucket, S3Server

SMALL_DISK_KIB = 600
"""Room for one checkpoint of ``_state`` (~410 KB), not for two."""
COMMAND_TIMEOUT_SECONDS = 30


def _state(seed: int, floats: int = 100 * 1024) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(floats, generator=gen), "b": torch.randn(16, generator=gen)}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A ``SMALL_DISK_KIB`` tmpfs mounted for this test, unmounted after it."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_KIB}k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=COMMAND_TIMEOUT_SECONDS)


def _loads(manager: CheckpointManager, step: int, want: dict[str, Any]) -> None:
    got = blank_like(want)
    used = manager.load(got)
    assert used is not None and used.step == step
    assert_states_equal(got, want)


def _save(manager: CheckpointManager, step: int, state: dict[str, Any]) -> None:
    manager.save(step, state, meta={})
    manager.wait()  # an async save reports its error here


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_mid_save_names_the_cause_and_file_and_loses_nothing(
    small_disk: Path, async_save: bool
) -> None:
    backend = Backend("file", (small_disk / "ckpts").as_uri())
    manager = backend.manager(async_save=async_save)
    _save(manager, 1, _state(1))

    with pytest.raises(StorageError) as failed:
        _save(manager, 2, _state(2))

    message = str(failed.value)
    assert "no space left on device" in message.lower()
    assert f"write {backend.url}/run/step-2/" in message  # the file being written
    assert "inline_container" not in message
    assert [m.step for m in manager.list()] == [1]
    assert not backend.storage().exists("run/step-2/manifest.json")
    _loads(manager, 1, _state(1))
    # With room again (a smaller state), the same step saves: the torn directory is cleared.
    _save(manager, 2, _state(2, floats=1024))
    manager.close()
    assert [m.step for m in manager.list()] == [1, 2]


class _FullDisk:
    """A write stream whose every write fails the way a full disk does."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def test_a_failed_write_in_dcps_second_write_thread_fails_the_save(local: Backend) -> None:
    # DCP's extra write thread only prints its exception; torch.save turns the OSError into
    # "RuntimeError: [enforce fail at inline_container.cc...]". Neither may hide the failure.
    original = _fsspec_filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self: Any, path: Any, mode: str) -> Iterator[Any]:
        with original(self, path, mode) as stream:
            in_dcp_thread = threading.current_thread() is not threading.main_thread()
            yield _FullDisk(stream) if "w" in mode and in_dcp_thread else stream

    manager = local.manager()
    manager.save(1, _state(1), meta={})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fsspec_filesystem.FileSystem, "create_stream", create_stream)
        with pytest.raises(StorageError) as failed:
            manager.save(2, _state(2), meta={})

    message = str(failed.value)
    assert f"write {local.url}/run/step-2/__0_" in message
    assert "No space left on device" in message and "inline_container" not in message
    assert [m.step for m in manager.list()] == [1]
    _loads(manager, 1, _state(1))


def _reset_auth(server: S3Server, initial_no_auth_action_count: str) -> None:
    request = urllib.request.Request(
        f"{server.endpoint_url}/moto-api/reset-auth",
        data=initial_no_auth_action_count.encode(),
        headers={"Content-Type": "text/plain"},  # a form body would hide it from moto
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=COMMAND_TIMEOUT_SECONDS):
        pass


@contextlib.contextmanager
def _credentials_refused_after_first_shard(server: S3Server) -> Iterator[threading.Event]:
    """From the moment the first shard of a save is uploaded, the server refuses the test's
    credentials (until the block ends)."""
    refused = threading.Event()
    original = _fsspec_filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self: Any, path: Any, mode: str) -> Iterator[Any]:
        with original(self, path, mode) as stream:
            yield stream
        if str(path).endswith(".distcp") and "w" in mode and not refused.is_set():
            refused.set()
            _reset_auth(server, "0")

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_fsspec_filesystem.FileSystem, "create_stream", create_stream)
            yield refused
    finally:
        _reset_auth(server, "inf")


def test_s3_refusing_writes_mid_save_names_the_url_and_loses_nothing(s3_bucket: S3Bucket) -> None:
    backend = Backend("s3", f"{s3_bucket.url}/ckpts", s3_bucket.storage_options)
    manager = backend.manager()
    manager.save(1, _state(1), meta={})

    with _credentials_refused_after_first_shard(s3_bucket.server) as refused:
        with pytest.raises(StorageError) as failed:
            manager.save(2, _state(2), meta={})
        assert refused.is_set()

    assert f"write {backend.url}/run/step-2/" in str(failed.value)
    assert [m.step for m in manager.list()] == [1]
    assert not backend.storage().exists("run/step-2/manifest.json")
    _loads(manager, 1, _state(1))
    manager.close()
