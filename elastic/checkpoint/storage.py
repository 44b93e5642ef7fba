"""Storage adapter: the one module of the repository that imports fsspec.

A :class:`Storage` is an fsspec filesystem rooted at a URL (``file://``, ``s3://``,
``memory://``, or a plain local path). Every other checkpoint module speaks relative paths
(``"run-1/step-50/manifest.json"``) to it and never sees fsspec, botocore or OS error types:
failures come out as :mod:`elastic.checkpoint.errors` types, with retryable network failures as
:class:`TemporaryStorageError`.

Caveats:

- Object stores have no directories and no rename; "directory" here means "key prefix", and
  :meth:`Storage.write_bytes` relies on a single PUT being atomic per object. On local disk it
  writes a temporary file, fsyncs it and renames it into place
  (:func:`elastic.files.replace_file`).
- s3fs caches listings per process, but other ranks write into the same prefixes, so every
  listing or existence check drops the cache for its path first.
- ``memory://`` is one dict per *process*: fine for single-process tests, useless across ranks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import fsspec
import torch.serialization
from fsspec.core import url_to_fs
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from elastic.checkpoint.errors import CheckpointNotFound, storage_error
from elastic.checkpoint.priority import BackgroundPriority
from elastic.checkpoint.writeback import WritebackFile
from elastic.files import replace_file

__all__ = ["Storage"]


class Storage:
    """Thin adapter over an fsspec filesystem rooted at ``url``."""

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self._options = dict(storage_options or {})
        with self._wrapped(f"open {url!r}"):
            fs, root = url_to_fs(url, **self._options)
        self._fs: fsspec.AbstractFileSystem = fs
        self._root = str(root).rstrip("/") or "/"
        self._local = "file" in _protocols(fs)
        # A relative local URL is resolved once, here, so a later chdir cannot move checkpoints.
        self.url: str = fs.unstrip_protocol(self._root).rstrip("/")

    @property
    def is_local(self) -> bool:
        """True for local disk (the only backend where fsync and rename mean something)."""
        return self._local

    def join(self, *parts: str) -> str:
        """Full URL of ``parts`` under the root (what DCP and users see)."""
        rel = _rel(*parts)
        return f"{self.url}/{rel}" if rel else self.url

    def exists(self, rel: str) -> bool:
        path = self._path(rel)
        with self._wrapped(f"exists {self.join(rel)}"):
            self._fs.invalidate_cache(path)
            return bool(self._fs.exists(path))

    def read_bytes(self, rel: str) -> bytes:
        url = self.join(rel)
        with self._wrapped(f"read {url}"):
            try:
                return bytes(self._fs.cat_file(self._path(rel)))
            except FileNotFoundError:
                raise CheckpointNotFound(f"read {url}: not found") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` so a reader sees either the old object or all of the new one."""
        path = self._path(rel)
        with self._wrapped(f"write {self.join(rel)}", reading=False):
            if self._local:
                replace_file(path, data, durable=True)
            else:
                self._fs.pipe_file(path, data)

    def list_dir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``rel``; empty when it is missing."""
        path = self._path(rel)
        with self._wrapped(f"list {self.join(rel)}"):
            self._fs.invalidate_cache(path)
            try:
                entries = self._fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
        names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
        return sorted(n for n in names if n)

    def sizes(self, rel_dir: str) -> dict[str, int]:
        """``{path relative to rel_dir: size_bytes}`` for every file below ``rel_dir``."""
        base = self._path(rel_dir)
        with self._wrapped(f"list {self.join(rel_dir)}"):
            self._fs.invalidate_cache(base)
            try:
                found = self._fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
        out: dict[str, int] = {}
        for path, info in found.items():
            if info.get("type", "file") != "file":
                continue
            rel = _relative_to(str(path), base)
            if rel:
                out[rel] = int(info.get("size") or 0)
        return out

    def remove(self, rel: str, *, recursive: bool = False) -> None:
        """Remove a file (or a whole prefix with ``recursive``); a missing path is not an error."""
        path = self._path(rel)
        with self._wrapped(f"remove {self.join(rel)}"):
            self._fs.invalidate_cache(path)
            if not self._fs.exists(path):
                return
            try:
                self._fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                return  # removed concurrently: the outcome asked for holds

    def writer(self, rel_dir: str, *, background_nice: int = 0) -> FsspecWriter:
        """A DCP storage writer for the checkpoint directory ``rel_dir``; threads other than
        the caller's that use it (an async save's) run at niceness ``background_nice``."""
        url = self.join(rel_dir)
        with self._wrapped(f"open writer {url}", reading=False):
            # fsync only means something on local disk; elsewhere DCP would fall back to a
            # machine-wide os.sync() per file, which is slow and buys nothing.
            return _Writer(
                url,
                priority=BackgroundPriority(background_nice),
                single_file_per_rank=True,
                sync_files=self._local,
                thread_count=WRITE_THREADS,
                overwrite=True,
                **self._options,
            )

    def reader(self, rel_dir: str) -> FsspecReader:
        """A DCP storage reader for the checkpoint directory ``rel_dir``."""
        url = self.join(rel_dir)
        with self._wrapped(f"open reader {url}"):
            return _Reader(url, **self._options)

    def _path(self, rel: str) -> str:
        rel = _rel(rel)
        if not rel:
            return self._root
        return f"{self._root.rstrip('/')}/{rel}"

    @contextmanager
    def _wrapped(self, what: str, *, reading: bool = True) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            # The adapter boundary: backends raise OSError, botocore and aiohttp types that share
            # no base class; callers only ever see CheckpointError subclasses.
            raise storage_error(exc, what, reading=reading) from exc


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _rel(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _relative_to(path: str, base: str) -> str:
    path, base = path.rstrip("/"), base.rstrip("/")
    if path.startswith(base + "/"):
        return path[len(base) + 1 :]
    # Some backends drop a leading "/" (memory) or add one; compare without it.
    stripped_path, stripped_base = path.lstrip("/"), base.lstrip("/")
    if stripped_path.startswith(stripped_base + "/"):
        return stripped_path[len(stripped_base) + 1 :]
    return ""


WRITE_THREADS = 2
"""Files (and threads) a rank's shard is written as: ``__<rank>_0.distcp``, ``__<rank>_1...``.

DCP serialises each tensor with ``torch.save`` into a Python file object, about 0.1 s of Python
per GiB-and-256-tensors on top of the bytes; with one thread that time adds to the write.
Two threads (DCP balances the tensors over the files by size) overlap one's Python with the
other's writes: on tmpfs, a 1 GiB save went from 0.47 s to 0.37 s (raw write 0.39 s).
"""


class _Writer(FsspecWriter):
    """DCP's fsspec writer, minus the CRC32 that ``torch.save`` computes for every record, and
    with early disk writeback of local shard files (:mod:`elastic.checkpoint.writeback`).

    The CRC costs ~0.24 s per GiB (a third of a local save) and protects nothing here:
    ``torch.load`` never checks it (a flipped byte loads silently with or without it), and
    torn or truncated shards are caught by the manifest's per-file sizes. Only external
    ``unzip`` tools would read it. The option is process-wide in torch, so it is switched off
    only while this writer writes (sync saves, or the background thread of an async one) and
    restored after.
    """

    def __init__(
        self, url: str, *, priority: BackgroundPriority, sync_files: bool, **kwargs: Any
    ) -> None:
        super().__init__(url, sync_files=sync_files, **kwargs)
        self._priority = priority
        if sync_files:  # local disk: the files are real files with a page cache
            # DCP annotates ``fs`` as its local FileSystem; FsspecWriter already stores its own.
            self.fs = _WritebackFileSystem.wrapping(self.fs)  # type: ignore[assignment]

    def set_up_storage_writer(self, *args: Any, **kwargs: Any) -> None:
        self._priority.apply()  # the first call DCP makes in an async save's thread
        super().set_up_storage_writer(*args, **kwargs)

    def write_data(self, plan: Any, planner: Any) -> Any:
        self._priority.apply()  # before the write threads start: they inherit it
        with _without_crc32():
            return super().write_data(plan, planner)


class _WritebackFileSystem(FileSystem):  # type: ignore[misc]
    """DCP's fsspec file system whose write streams start disk writeback as they go."""

    @classmethod
    def wrapping(cls, base: Any) -> _WritebackFileSystem:
        wrapped = cls()
        wrapped.fs = base.fs
        return wrapped

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            yield WritebackFile(stream) if "w" in mode else stream


@contextmanager
def _without_crc32() -> Iterator[None]:
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


READ_THREADS = 2
"""Threads that read one load plan's tensors (each its own stream, its own run of the file)."""


class _Reader(FsspecReader):
    """DCP's fsspec reader, with the tensors of a plan read by ``READ_THREADS`` threads.

    DCP reads a rank's items one after another, and each ``torch.load`` spends about as long
    in Python (unpickling, allocating, copying into the target) as the disk spends reading, so
    a single thread leaves the disk idle half the time. Here the tensor items are sorted by
    file and offset, cut into ``READ_THREADS`` runs of about equal bytes, and each run is read
    by DCP's own ``read_data`` in a thread of its own: one thread's Python overlaps the other's
    reads (file reads and copies release the GIL). Non-tensor items are read first, in the
    caller's thread, as DCP does. The default load planner only looks tensors up and copies
    into them, so concurrent ``resolve_tensor``/``commit_tensor`` calls are safe.
    """

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        tensors = [i for i in plan.items if i.type != LoadItemType.BYTE_IO]
        if READ_THREADS < 2 or len(tensors) < 2:
            return super().read_data(plan, planner)
        others = [i for i in plan.items if i.type == LoadItemType.BYTE_IO]
        super().read_data(dataclasses.replace(plan, items=others), planner).wait()
        runs = _runs(sorted(tensors, key=self._position), self._length, READ_THREADS)
        with ThreadPoolExecutor(len(runs), thread_name_prefix="checkpoint-read") as pool:
            parts = [
                pool.submit(
                    FsspecReader.read_data, self, dataclasses.replace(plan, items=r), planner
                )
                for r in runs
            ]
            for part in parts:
                part.result().wait()  # re-raises a thread's failure here
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _position(self, item: ReadItem) -> tuple[str, int]:
        info = self.storage_data[item.storage_index]
        return str(info.relative_path), int(info.offset)

    def _length(self, item: ReadItem) -> int:
        return int(self.storage_data[item.storage_index].length)


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
