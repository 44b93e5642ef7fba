"""Early disk writeback for checkpoint shard files: the disk writes while DCP still serialises.

A plain ``write`` only copies bytes into the page cache; the disk starts on them when the
kernel's flusher wakes (seconds later, or past ``vm.dirty_background_ratio``) or at the final
``fsync``. For a checkpoint that means: first serialise and copy the whole shard into memory,
then wait for the disk to write all of it. :class:`WritebackFile` asks the kernel to start
writing each ``WRITEBACK_BYTES`` as soon as they are written (Linux ``sync_file_range`` with
``SYNC_FILE_RANGE_WRITE``: start, do not wait), so the two overlap and the final ``fsync`` only
waits for the tail. Durability is unchanged: the writer still fsyncs every file before the
manifest commits.

Python's ``os`` has no ``sync_file_range`` (and no library wraps it), so it is called through
``ctypes``; where libc lacks it (not Linux) or a call fails (a filesystem without it), writes
go on without it, exactly as before.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["WRITEBACK_BYTES", "WritebackFile", "start_writeback"]

WRITEBACK_BYTES = 16 * 1024 * 1024
"""Bytes written between two writeback requests. On this project's bench disk (virtio, ext4),
a 1 GiB write + fsync took 0.72 s plain and 0.50 s with requests every 8-32 MiB; 128 MiB
left most of the gain on the table (0.75 s)."""

_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages in the range, no wait


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def start_writeback(fd: int, offset_bytes: int, length_bytes: int) -> bool:
    """Ask the kernel to start writing ``fd``'s dirty pages in the range; False if it cannot."""
    fn = _sync_file_range()
    if fn is None:
        return False
    return fn(fd, offset_bytes, length_bytes, _SYNC_FILE_RANGE_WRITE) == 0


class _RawFile(Protocol):
    def write(self, data: Any, /) -> int: ...
    def flush(self) -> None: ...
    def tell(self) -> int: ...
    def fileno(self) -> int: ...


class WritebackFile:
    """A binary file that starts writeback of every ``chunk_bytes`` it is given.

    Wraps an open, writable file object with a real ``fileno()`` and passes everything else
    through, so DCP's ``tell()``-based offsets, ``flush()`` and ``fsync(fileno())`` see the file.
    After the first refused request it stops asking (the filesystem does not do it).
    """

    def __init__(self, raw: _RawFile, *, chunk_bytes: int = WRITEBACK_BYTES) -> None:
        self._raw = raw
        self._chunk_bytes = chunk_bytes
        self._started_bytes = raw.tell()  # everything before is the kernel's business
        self._pending_bytes = 0
        self._enabled = True

    def write(self, data: Any) -> int:
        written = self._raw.write(data)
        self._pending_bytes += written
        if self._enabled and self._pending_bytes >= self._chunk_bytes:
            self._kick()
        return written

    def _kick(self) -> None:
        self._raw.flush()  # from Python's buffer into the page cache first
        end = self._raw.tell()
        self._enabled = start_writeback(
            self._raw.fileno(), self._started_bytes, end - self._started_bytes
        )
        self._started_bytes, self._pending_bytes = end, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)
