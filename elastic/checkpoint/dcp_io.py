"""DCP's storage reader and writer for checkpoint directories, with integrity built in.

:class:`CheckpointWriter` writes a rank's shards as ``WRITE_THREADS`` files, hashing every file
as it writes it (:attr:`CheckpointWriter.written`), starting disk writeback early on local
disk, and reporting a failed write (a full disk, a refused PUT) as a
:class:`~elastic.checkpoint.errors.StorageError` naming the file and the cause.
:class:`CheckpointReader` opens only the files a manifest lists and reads each once, checking
its BLAKE3 before DCP deserialises anything from it (``integrity.py``). Both go through
DCP's fsspec file system; :class:`~elastic.checkpoint.storage.Storage` builds them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import IO, Any, cast

import torch.serialization
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
)
from torch.futures import Future

from elastic.checkpoint.errors import (
    CheckpointError,
    CheckpointUntrusted,
    is_temporary,
    storage_error,
)
from elastic.checkpoint.in_place import NotInPlace, tensor_in_place
from elastic.checkpoint.integrity import (
    DigestingFile,
    MemoryFile,
    WrittenFile,
    read_verified,
    verified_chunks,
)
from elastic.checkpoint.priority import BackgroundPriority
from elastic.checkpoint.storage import relative_to
from elastic.checkpoint.streamed import (
    STREAM_MIN_BYTES,
    Destination,
    ItemStream,
    StorageLayout,
)
from elastic.checkpoint.writeback import WritebackFile

__all__ = ["READ_THREADS", "WRITE_THREADS", "CheckpointReader", "CheckpointWriter", "relative_to"]


WRITE_THREADS = 2
"""Files (and threads) a rank's shard is written as: ``__<rank>_0.distcp``, ``__<rank>_1...``.

DCP serialises each tensor with ``torch.save`` into a Python file object, about 0.1 s of Python
per GiB-and-256-tensors on top of the bytes; with one thread that time adds to the write.
Two threads (DCP balances the tensors over the files by size) overlap one's Python with the
other's writes: on tmpfs, a 1 GiB save went from 0.47 s to 0.37 s (raw write 0.39 s).
"""


class CheckpointWriter(FsspecWriter):
    """DCP's fsspec writer, plus: a BLAKE3 of every file as it is written
    (:attr:`written`), a failed write named as such, no CRC32 in ``torch.save`` records, and
    early disk writeback of local shard files (:mod:`elastic.checkpoint.writeback`).

    The CRC costs ~0.24 s per GiB (a third of a local save) and protects nothing here:
    ``torch.load`` never checks it; the manifest's BLAKE3 of each file catches what it
    would. Only external ``unzip`` tools would read it. The option is process-wide in torch,
    so it is switched off only while this writer writes (sync saves, or the background thread
    of an async one) and restored after.
    """

    def __init__(
        self, url: str, *, priority: BackgroundPriority, sync_files: bool, **kwargs: Any
    ) -> None:
        super().__init__(url, sync_files=sync_files, **kwargs)
        self._priority = priority
        # DCP annotates ``fs`` as its local FileSystem; FsspecWriter already stores its own.
        self.fs: _RecordingFileSystem = _RecordingFileSystem(  # type: ignore[assignment]
            self.fs, root=str(self.path), writeback=sync_files
        )

    @property
    def written(self) -> dict[str, WrittenFile]:
        """The files this rank wrote (``.metadata`` on the coordinator too), by name."""
        return self.fs.snapshot()

    def set_up_storage_writer(self, *args: Any, **kwargs: Any) -> None:
        self._priority.apply()  # the first call DCP makes in an async save's thread
        super().set_up_storage_writer(*args, **kwargs)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Any:
        self._priority.apply()  # before the write threads start: they inherit it
        with _without_crc32():
            future = super().write_data(plan, planner)
        # DCP's extra write threads print their exception and end: without this check their
        # items would silently be missing from .metadata, and the save would commit.
        self.fs.raise_failure()
        missing = len(plan.items) - len(future.value())
        if missing:
            raise CheckpointError(
                f"write {self.path}: {missing} of {len(plan.items)} items were not written"
            )
        return future


class _RecordingFileSystem(FileSystem):  # type: ignore[misc]
    """DCP's fsspec file system whose write streams hash what they write (and start disk
    writeback as they go, on local disk); failures are kept, named after the file."""

    def __init__(self, base: Any, *, root: str, writeback: bool) -> None:
        super().__init__()
        self.fs = base.fs
        self._root = root
        self._writeback = writeback
        self._lock = threading.Lock()
        self._written: dict[str, WrittenFile] = {}
        self._failures: list[BaseException] = []

    def snapshot(self) -> dict[str, WrittenFile]:
        with self._lock:
            return dict(self._written)

    def raise_failure(self) -> None:
        with self._lock:
            failure = self._failures[0] if self._failures else None
        if failure is not None:
            raise failure

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        if not any(c in mode for c in "wa+"):
            with super().create_stream(path, mode) as plain:
                yield plain
            return
        url = os.fspath(path)
        stream: DigestingFile | None = None
        try:
            with super().create_stream(path, mode) as raw:  # removes the file on an error
                stream = DigestingFile(WritebackFile(raw) if self._writeback else raw)
                yield stream
        except Exception as exc:
            error = _write_error(exc, stream, url)
            with self._lock:
                self._failures.append(error)
            if error is exc:
                raise
            raise error from exc
        assert stream is not None
        with self._lock:
            self._written[relative_to(url, self._root) or url] = stream.record()

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        with self._lock:
            record = self._written.pop(relative_to(os.fspath(path), self._root), None)
            if record is not None:
                self._written[relative_to(os.fspath(new_path), self._root)] = record


def _write_error(exc: Exception, stream: DigestingFile | None, url: str) -> BaseException:
    """The error to report for a failed write of ``url``: the storage's own error (which
    ``torch.save`` hides behind ``RuntimeError: [enforce fail at inline_container.cc...]``),
    as a checkpoint error naming the file; anything else unchanged."""
    cause: BaseException = exc
    if stream is not None and stream.error is not None:
        cause = stream.error
    if isinstance(cause, CheckpointError):
        return cause
    if isinstance(cause, OSError) or is_temporary(cause):
        return storage_error(cause, f"write {url}", reading=False)
    return exc


@contextmanager
def _without_crc32() -> Iterator[None]:
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


READ_THREADS = 2
"""Threads that read, check and deserialise a rank's files, a whole file each at a time (or
the runs of a single file's tensors)."""


class CheckpointReader(FsspecReader):
    """DCP's fsspec reader that deserialises only bytes it has checked, in ``READ_THREADS``
    threads.

    Every file is opened through :class:`_VerifiedFileSystem`: read once into memory, hashed,
    compared with the manifest, and only then handed to DCP (``pickle.load`` of ``.metadata``,
    ``torch.load`` of every item). Reading, hashing (BLAKE3, ~7 GB/s a core) and deserialising
    a file run one after the other, so files run in parallel: each of ``READ_THREADS``
    threads takes a whole file (largest first), reads and hashes it, then deserialises its
    items, non-tensor items first as DCP does. A rank writes ``WRITE_THREADS`` files of about
    equal size, so its load keeps as many cores busy, and holds at most ``READ_THREADS`` files
    in memory at a time.
    A plan with a single file is read and checked by one thread, then its tensors are cut
    into ``READ_THREADS`` runs of about equal bytes, deserialised in parallel. The default
    load planner only looks tensors up and copies into them, so concurrent
    ``resolve_tensor``/``commit_tensor`` calls are safe.
    """

    def __init__(
        self,
        url: str,
        *,
        files: Mapping[str, int],
        blake3: Mapping[str, str],
        chunks: Mapping[str, Sequence[str]],
        chunk_bytes: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, **kwargs)
        self.fs: _VerifiedFileSystem = _VerifiedFileSystem(  # type: ignore[assignment]
            self.fs,
            root=str(self.path),
            files=files,
            blake3=blake3,
            chunks=chunks,
            chunk_bytes=chunk_bytes,
        )

    @property
    def failure(self) -> CheckpointUntrusted | None:
        """The first file of this rank that did not match the manifest, if any."""
        return self.fs.failure

    def read_metadata(self, *args: Any) -> Metadata:  # type: ignore[override]
        # No ``**kwargs``: DCP then never falls back to rank-local ``__<rank>.metadata``
        # files (which no manifest lists) when ``.metadata`` fails to verify.
        metadata: Metadata = super().read_metadata(*args)
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list[ReadItem]] = {}
        for item in sorted(plan.items, key=self._order):
            by_file.setdefault(self._position(item)[0], []).append(item)
        names = sorted(by_file, key=lambda n: -sum(map(self._length, by_file[n])))
        plans = {n: dataclasses.replace(plan, items=items) for n, items in by_file.items()}
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="checkpoint-read") as pool:
            if len(names) == 1:
                self._read_file(names[0], plans[names[0]], planner, runs_on=pool)
            else:
                parts = [pool.submit(self._read_file, n, plans[n], planner) for n in names]
                for part in parts:
                    part.result()  # re-raises a thread's failure here
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_file(
        self,
        name: str,
        plan: LoadPlan,
        planner: LoadPlanner,
        *,
        runs_on: ThreadPoolExecutor | None = None,
    ) -> None:
        """Read and check ``name``, then deserialise ``plan`` (its items) from that memory;
        with ``runs_on``, the tensors in ``READ_THREADS`` runs on that pool. A file with chunk
        digests is streamed instead (:meth:`_stream_file`)."""
        infos = [self.storage_data[i.storage_index] for i in plan.items]
        if self.fs.has_chunks(name) and not any(i.transform_descriptors for i in infos):
            self._stream_file(name, plan.items, planner)
            return
        data = self.fs.fetch(name)
        with self.fs.serving(name, data):
            others = [i for i in plan.items if i.type == LoadItemType.BYTE_IO]
            tensors = [i for i in plan.items if i.type != LoadItemType.BYTE_IO]
            if others:
                FsspecReader.read_data(self, dataclasses.replace(plan, items=others), planner)
            if runs_on is None:
                self._load_tensors(data, plan, tensors, planner)
                return
            runs = [r for r in _runs(tensors, self._length, READ_THREADS) if r]
            parts = [runs_on.submit(self._load_tensors, data, plan, r, planner) for r in runs]
            for part in parts:
                part.result()

    def _stream_file(self, name: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        """Read ``name`` a checked chunk at a time, each item's tensor bytes copied into their
        destinations as they go by (``streamed.py``); other items gathered and loaded whole."""
        by_offset: dict[int, list[ReadItem]] = {}
        for item in items:
            by_offset.setdefault(self._position(item)[1], []).append(item)
        streams = []
        for offset in sorted(by_offset):
            reads = by_offset[offset]
            length = self._length(reads[0])
            tensor = all(r.type != LoadItemType.BYTE_IO for r in reads)
            sink = _PlannerSink(self, reads, planner)
            streamable = tensor and length >= STREAM_MIN_BYTES
            streams.append(ItemStream(offset, length, sink, streamable=streamable))
        pending = iter(streams)
        current = next(pending, None)
        for chunk_offset, chunk in self.fs.verified_chunks(name):
            chunk_end = chunk_offset + chunk.nbytes
            while current is not None and current.offset < chunk_end:
                lo, hi = max(current.offset, chunk_offset), min(current.end, chunk_end)
                current.feed(chunk[lo - chunk_offset : hi - chunk_offset])
                if current.end > chunk_end:
                    break
                current.finish()
                current = next(pending, None)
        if current is not None:
            raise CheckpointError(f"{name}: item at byte {current.offset} lies past the file")

    def _load_tensors(
        self, data: memoryview, plan: LoadPlan, items: list[ReadItem], planner: LoadPlanner
    ) -> None:
        """Copy each tensor item from ``data`` (its checked file) into its destination: viewed
        in place where it can be (``in_place.py``, one copy), else through DCP's ``torch.load``.
        """
        others: list[ReadItem] = []
        for item in items:
            info = self.storage_data[item.storage_index]
            try:
                if info.transform_descriptors:
                    raise NotInPlace("transformed on save")
                tensor = tensor_in_place(data[info.offset : info.offset + info.length])
            except NotInPlace:
                others.append(item)
                continue
            self.copy_into(item, tensor, planner)
        if others:
            FsspecReader.read_data(self, dataclasses.replace(plan, items=others), planner).wait()

    def copy_into(self, item: ReadItem, tensor: torch.Tensor, planner: LoadPlanner) -> None:
        """Copy ``item``'s part of ``tensor`` (the whole saved tensor) into its destination."""
        saved = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = self.target_for(item, saved, planner)
        target.copy_(saved)
        planner.commit_tensor(item, target)

    def target_for(self, item: ReadItem, saved: torch.Tensor, planner: LoadPlanner) -> torch.Tensor:
        """``item``'s destination, checked against ``saved`` (its part of the saved tensor)."""
        target = planner.resolve_tensor(item).detach()
        if target.size() != saved.size():
            info = self.storage_data[item.storage_index]
            raise CheckpointError(
                f"{info.relative_path}: {item.storage_index.fqn} is {tuple(saved.size())}"
                f" in the checkpoint, {tuple(target.size())} in the state loaded into"
            )
        return target

    def _order(self, item: ReadItem) -> tuple[str, bool, int]:
        """File, then non-tensor items first, then offset."""
        path, offset = self._position(item)
        return path, item.type != LoadItemType.BYTE_IO, offset

    def _position(self, item: ReadItem) -> tuple[str, int]:
        info = self.storage_data[item.storage_index]
        return str(info.relative_path), int(info.offset)

    def _length(self, item: ReadItem) -> int:
        return int(self.storage_data[item.storage_index].length)


class _PlannerSink:
    """One stored item's reads, delivered to DCP's load planner (a ``streamed.ItemSink``)."""

    def __init__(self, reader: CheckpointReader, reads: list[ReadItem], planner: LoadPlanner):
        self._reader = reader
        self._reads = reads
        self._planner = planner
        self._targets: list[torch.Tensor] = []

    def destinations(self, layout: StorageLayout) -> list[Destination]:
        destinations, targets = [], []
        for read in self._reads:
            saved = narrow_tensor_by_index(layout.tensor, read.storage_offsets, read.lengths)
            target = self._reader.target_for(read, saved, self._planner)
            same = target.dtype == saved.dtype and target.device.type != "meta"
            if not (same and target.is_contiguous() and saved.is_contiguous()):
                raise NotInPlace("a destination of another dtype or not contiguous")
            start = int(saved.storage_offset()) * saved.element_size()
            if start + saved.numel() * saved.element_size() > layout.payload_bytes:
                raise NotInPlace("a part beyond the storage record")
            destinations.append(Destination(start, target.view(-1).view(torch.uint8)))  # no copy
            targets.append(target)
        self._targets = targets
        return destinations

    def streamed(self) -> None:
        for read, target in zip(self._reads, self._targets, strict=True):
            self._planner.commit_tensor(read, target)

    def whole(self, blob: memoryview) -> None:
        saved: torch.Tensor | None = None  # parsed once for every read of this item
        for read in self._reads:
            if read.type == LoadItemType.BYTE_IO:
                self._planner.load_bytes(read, io.BytesIO(bytes(blob)))
                continue
            saved = _saved_tensor(blob) if saved is None else saved
            self._reader.copy_into(read, saved, self._planner)


def _saved_tensor(blob: memoryview) -> torch.Tensor:
    """The tensor ``torch.save``d in ``blob``: viewed in place, else through ``torch.load``."""
    try:
        return tensor_in_place(blob)
    except NotInPlace:
        loaded = torch.load(
            cast(IO[bytes], MemoryFile(blob)), map_location="cpu", weights_only=True
        )
        if not isinstance(loaded, torch.Tensor):
            raise CheckpointError(f"a tensor item holds a {type(loaded).__name__}") from None
        return loaded


class _VerifiedFileSystem(FileSystem):  # type: ignore[misc]
    """DCP's fsspec file system, read side: only listed files, each checked before use."""

    def __init__(
        self,
        base: Any,
        *,
        root: str,
        files: Mapping[str, int],
        blake3: Mapping[str, str],
        chunks: Mapping[str, Sequence[str]],
        chunk_bytes: int,
    ) -> None:
        super().__init__()
        self.fs = base.fs
        self._root = root
        self._files = dict(files)
        self._blake3 = dict(blake3)
        self._chunks = dict(chunks)
        self._chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._serving: dict[str, memoryview] = {}
        self.failure: CheckpointUntrusted | None = None

    def has_chunks(self, name: str) -> bool:
        return name in self._chunks

    def fetch(self, name: str) -> memoryview:
        """The bytes of ``name``, read once and checked against the manifest."""
        with self._reading(name) as stream:
            return read_verified(
                stream, name=name, size_bytes=self._files[name], blake3=self._blake3.get(name)
            )

    def verified_chunks(self, name: str) -> Iterator[tuple[int, memoryview]]:
        """``name`` a chunk at a time, each checked against the manifest before it is
        yielded (``integrity.verified_chunks``: use each before asking for the next)."""
        with self._reading(name) as stream:
            yield from verified_chunks(
                stream,
                name=name,
                size_bytes=self._files[name],
                chunk_bytes=self._chunk_bytes,
                digests=self._chunks[name],
            )

    @contextmanager
    def _reading(self, name: str) -> Iterator[Any]:
        """The stored file ``name`` open for reading; a file that fails its check is kept
        in :attr:`failure`, a storage failure is reported as a checkpoint storage error."""
        try:
            if name not in self._files:
                raise CheckpointUntrusted(f"{name}: not listed in the manifest", file=name)
            path = self.concat_path(self._root, name)
            try:
                with super().create_stream(path, "rb") as stream:
                    yield stream
            except CheckpointError:
                raise
            except Exception as exc:
                raise storage_error(exc, f"read {path}") from exc
        except CheckpointUntrusted as exc:
            self.failure = self.failure or exc
            raise

    @contextmanager
    def serving(self, name: str, data: memoryview) -> Iterator[None]:
        """Serve ``name`` from ``data`` (already checked) until the block ends."""
        with self._lock:
            self._serving[name] = data
        try:
            yield
        finally:
            with self._lock:
                del self._serving[name]

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        if mode != "rb":
            raise CheckpointError(f"{os.fspath(path)}: mode {mode!r}; a checkpoint reader reads")
        name = relative_to(os.fspath(path), self._root) or os.fspath(path)
        with self._lock:
            data = self._serving.get(name)
        # Not being served (.metadata): fetched and checked now, dropped after use.
        yield MemoryFile(data if data is not None else self.fetch(name))


def _runs(
    items: list[ReadItem], size: Callable[[ReadItem], int], count: int
) -> list[list[ReadItem]]:
    """``items`` cut into at most ``count`` consecutive runs of about equal total ``size``."""
    total = sum(size(i) for i in items)
    runs: list[list[ReadItem]] = [[]]
    filled = 0
    for item in items:
        if runs[-1] and filled >= total * len(runs) / count and len(runs) < count:
            runs.append([])
        runs[-1].append(item)
        filled += size(item)
    return runs
