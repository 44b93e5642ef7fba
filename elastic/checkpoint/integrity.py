"""Integrity: a BLAKE3 per checkpoint file, computed while writing, checked before reading.

Every checkpoint file is hashed while it is written (:class:`DigestingFile` sits in the write
stream, so a save never reads its files back), whole and in ``DIGEST_CHUNK_BYTES`` chunks, and
the manifest lists both. A load reads each shard once, a chunk at a time through one reused
buffer, and compares each chunk's digest (:func:`verified_chunks`) before any byte of it is
used (``streamed.py`` copies tensor bytes into place, anything else is deserialised from
checked memory); small files such as ``.metadata``, and the files of a manifest without chunk
digests (format 2), are read whole into memory and checked (:func:`read_verified`) before a
single byte reaches ``pickle`` or ``torch.load``, then served from that memory
(:class:`MemoryFile`). Either way what was checked is exactly what is used (re-reading a file
after checking it would let a file swapped in between pass).

A digest only catches accidents unless the manifest that lists it is trusted too: with a
signing key (``checkpoint.signing_key_file``, ``signing.py``) the manifest carries an
HMAC-SHA256 over its canonical JSON, and a writer without the key cannot produce a checkpoint
that loads. That is also why the per-file digest is a cryptographic hash: with a CRC or xxHash
anyone could craft a shard that matches a signed digest.

Why BLAKE3 (the ``blake3`` package, the BLAKE3 team's bindings to their Rust implementation):
it is a cryptographic hash, and on the project's machine one thread hashes 7.9 GB/s with it
against 2.1-2.2 GB/s with ``hashlib.sha256`` (OpenSSL 3.0 with SHA extensions) and 1.0-1.4 GB/s
with ``blake2b``: a fast disk reads 3 GB/s, so with SHA-256 a load was bound by one core's
hashing (0.43-0.46x of the raw read, against 0.8x targeted); ``python
bench/checkpoint_throughput.py`` prints the three for the machine it runs on. The hasher
releases the GIL while it hashes, so the threads that write (or read) a rank's files hash in
parallel.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import mmap
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import blake3
import numpy

from elastic.checkpoint.errors import CheckpointUntrusted

__all__ = [
    "DIGEST_ALGORITHM",
    "DIGEST_CHUNK_BYTES",
    "DigestingFile",
    "MemoryFile",
    "WrittenFile",
    "hash_stream",
    "read_verified",
    "verified_chunks",
]

DIGEST_ALGORITHM = "blake3"
READ_CHUNK_BYTES = 8 * 1024 * 1024
"""Bytes read (then hashed) at a time; the kernel reads ahead on local disk meanwhile."""
DIGEST_CHUNK_BYTES = 16 * 1024 * 1024
"""Each file is also hashed in chunks of this many bytes (the last one shorter), listed in
the manifest (format 3), so a load can check a chunk and use it before reading the next one
(``streamed.py``) instead of holding the whole file. 1 GiB of state lists 64 chunk digests."""


def new_hasher() -> Any:
    return blake3.blake3()


@dataclass(frozen=True)
class WrittenFile:
    """What a writer put into one checkpoint file: its size, its BLAKE3 (hex) and the BLAKE3
    of each ``DIGEST_CHUNK_BYTES`` chunk of it (hex, in order; none for an empty file)."""

    size_bytes: int
    blake3: str
    chunks: tuple[str, ...] = ()
    chunk_bytes: int = DIGEST_CHUNK_BYTES


class _ChunkHasher:
    """BLAKE3 of each ``chunk_bytes`` chunk of a byte stream fed in pieces of any size."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._hasher = new_hasher()
        self._filled = 0
        self.digests: list[str] = []

    def update(self, view: memoryview) -> None:
        while view.nbytes:
            take = min(view.nbytes, self.chunk_bytes - self._filled)
            self._hasher.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk_bytes:
                self._close_chunk()

    def finish(self) -> tuple[str, ...]:
        if self._filled:
            self._close_chunk()
        return tuple(self.digests)

    def _close_chunk(self) -> None:
        self.digests.append(self._hasher.hexdigest())
        self._hasher, self._filled = new_hasher(), 0


class _Readable(Protocol):
    def readinto(self, buffer: Any, /) -> int | None: ...
    def read(self, size: int = -1, /) -> bytes: ...


class DigestingFile:
    """A writable binary file that hashes and counts every byte written through it.

    Wraps an open file object and passes everything else through (DCP's ``tell()`` offsets,
    ``flush()``, ``fsync(fileno())``). Writes must be sequential, so ``seek`` is refused: a
    seek would make the digest describe bytes the file does not hold. The first error of the
    underlying file is kept in :attr:`error`, because ``torch.save`` replaces an ``OSError``
    raised inside its writer (a full disk) with a ``RuntimeError`` that does not say why.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._hasher = new_hasher()
        self._chunks = _ChunkHasher(DIGEST_CHUNK_BYTES)
        self.size_bytes = 0
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data)
        try:
            written = self._raw.write(data)
        except Exception as exc:
            self.error = self.error or exc
            raise
        count = view.nbytes if written is None else int(written)
        done = view.cast("B")[:count]
        self._hasher.update(done)
        self._chunks.update(done)
        self.size_bytes += count
        return count

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        raise io.UnsupportedOperation("checkpoint files are written front to back")

    def record(self) -> WrittenFile:
        return WrittenFile(
            size_bytes=self.size_bytes,
            blake3=self._hasher.hexdigest(),
            chunks=self._chunks.finish(),
            chunk_bytes=self._chunks.chunk_bytes,
        )

    def _call(self, name: str) -> None:
        try:
            getattr(self._raw, name)()
        except Exception as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def read_verified(
    stream: _Readable, *, name: str, size_bytes: int, blake3: str | None
) -> memoryview:
    """All of ``stream`` (the file ``name``), read once and checked against the manifest.

    Raises :class:`CheckpointUntrusted` naming the file when its length differs from
    ``size_bytes`` or its BLAKE3 from ``blake3`` (``None``: a manifest of format 1, which
    lists sizes only).
    """
    view = _fresh_memory(size_bytes)
    hasher = new_hasher()
    done = 0
    while done < size_bytes:
        count = stream.readinto(view[done : done + READ_CHUNK_BYTES])
        if not count:
            raise CheckpointUntrusted(
                f"{name}: {done} bytes, manifest says {size_bytes}", file=name
            )
        hasher.update(view[done : done + count])
        done += count
    if stream.read(1):
        raise CheckpointUntrusted(f"{name}: longer than the {size_bytes} bytes listed", file=name)
    _compare(name, hasher.hexdigest(), blake3)
    return view


def verified_chunks(
    stream: _Readable, *, name: str, size_bytes: int, chunk_bytes: int, digests: Sequence[str]
) -> Iterator[tuple[int, memoryview]]:
    """``stream`` (the file ``name``) chunk by chunk, each checked before it is yielded.

    Yields ``(offset, chunk)`` for each ``chunk_bytes`` chunk (the last one shorter) once its
    BLAKE3 matched ``digests``; a chunk's memory is reused once the caller asks for the next
    one. A thread reads the next chunk while the caller hashes and uses this one (reading
    and then hashing in turn left the disk idle a third of the time). Raises
    :class:`CheckpointUntrusted` naming the file when a chunk does not match, or the file is
    shorter or longer than ``size_bytes``.
    """
    expected = -(-size_bytes // chunk_bytes) if chunk_bytes > 0 else -1
    if len(digests) != expected:
        raise CheckpointUntrusted(
            f"{name}: {len(digests)} chunk digests listed for {size_bytes} bytes", file=name
        )
    with _ChunkReader(stream, name=name, size_bytes=size_bytes, chunk_bytes=chunk_bytes) as chunks:
        for digest in digests:
            offset, chunk = chunks.next()
            hasher = new_hasher()  # one thread: the threads reading other files use the others
            hasher.update(chunk)
            _compare(name, hasher.hexdigest(), digest, where=f"chunk at byte {offset}: ")
            yield offset, chunk
            chunks.release(chunk)
        chunks.end()


class _ChunkReader:
    """Reads a file's chunks in a thread, up to two chunks ahead of the one in use (one
    ahead left the reader waiting whenever a chunk took longer to use than to read)."""

    _BUFFERS = 3

    def __init__(self, stream: _Readable, *, name: str, size_bytes: int, chunk_bytes: int) -> None:
        self._stream = stream
        self._name = name
        self._size_bytes = size_bytes
        self._chunk_bytes = chunk_bytes
        self._free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[int, memoryview] | bool | BaseException] = (
            queue.SimpleQueue()
        )
        for _ in range(self._BUFFERS if size_bytes else 0):
            self._free.put(memoryview(bytearray(min(size_bytes, chunk_bytes))))
        self._thread = threading.Thread(
            target=self._read_all, name="checkpoint-chunks", daemon=True
        )

    def __enter__(self) -> _ChunkReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._free.put(None)  # stops a reader still going (the caller gave up early)
        self._thread.join()

    def next(self) -> tuple[int, memoryview]:
        item = self._full.get()
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, tuple), item
        return item

    def release(self, chunk: memoryview) -> None:
        self._free.put(memoryview(chunk.obj))  # the whole buffer the chunk was cut from

    def end(self) -> None:
        """Raise unless the file ended where the manifest says."""
        item = self._full.get()
        if isinstance(item, BaseException):
            raise item
        if item is True:
            raise CheckpointUntrusted(
                f"{self._name}: longer than the {self._size_bytes} bytes listed", file=self._name
            )

    def _read_all(self) -> None:
        try:
            for offset in range(0, self._size_bytes, self._chunk_bytes):
                buffer = self._free.get()
                if buffer is None:
                    return
                chunk = buffer[: min(self._chunk_bytes, self._size_bytes - offset)]
                self._fill(chunk, offset)
                self._full.put((offset, chunk))
            self._full.put(bool(self._stream.read(1)))
        except BaseException as exc:  # handed to the caller, who raises it
            self._full.put(exc)

    def _fill(self, chunk: memoryview, offset: int) -> None:
        done = 0
        while done < chunk.nbytes:
            count = self._stream.readinto(chunk[done:])
            if not count:
                raise CheckpointUntrusted(
                    f"{self._name}: {offset + done} bytes, manifest says {self._size_bytes}",
                    file=self._name,
                )
            done += count


def _fresh_memory(size_bytes: int) -> memoryview:
    """Writable memory for a whole file, in huge pages where Linux allows it.

    Fresh memory costs a page fault per 4 KiB page on first touch: about 0.5 s per GiB here,
    as much as hashing it. An anonymous private mapping advised ``MADV_HUGEPAGE`` faults once
    per 2 MiB (0.03 s instead of 0.14 s to fill 256 MiB). It is unmapped when the last view
    of it goes away.
    """
    if size_bytes == 0:
        return memoryview(bytearray())
    region = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or THP switched off
        region.madvise(mmap.MADV_HUGEPAGE)
    return memoryview(region)


def hash_stream(stream: _Readable, *, chunk_bytes: int = DIGEST_CHUNK_BYTES) -> WrittenFile:
    """Size, BLAKE3 and chunk digests of everything left in ``stream`` (for checking without
    keeping it)."""
    buffer = bytearray(READ_CHUNK_BYTES)
    view = memoryview(buffer)
    hasher = new_hasher()
    chunks = _ChunkHasher(chunk_bytes)
    size_bytes = 0
    while count := stream.readinto(view):
        hasher.update(view[:count])
        chunks.update(view[:count])
        size_bytes += count
    return WrittenFile(
        size_bytes=size_bytes,
        blake3=hasher.hexdigest(),
        chunks=chunks.finish(),
        chunk_bytes=chunk_bytes,
    )


def _compare(name: str, actual: str, expected: str | None, *, where: str = "") -> None:
    if expected is not None and not hmac.compare_digest(actual, expected):
        raise CheckpointUntrusted(
            f"{name}: digest mismatch ({where}blake3 of the bytes read {actual[:16]}..., "
            f"manifest says {expected[:16]}...)",
            file=name,
        )


_BIG_COPY_BYTES = 1024 * 1024


class MemoryFile(io.RawIOBase):
    """A read-only, seekable file over verified bytes (no copy until a reader asks)."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data = data
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        count = max(0, min(len(target), len(self._data) - self._position))
        source = self._data[self._position : self._position + count]
        if count >= _BIG_COPY_BYTES:  # numpy copies without the GIL: other readers go on
            numpy.copyto(numpy.frombuffer(target[:count], numpy.uint8), source)
        else:
            target[:count] = source
        self._position += count
        return count

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: len(self._data)}
        position = base[whence] + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def tell(self) -> int:
        return self._position
