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

DCP's reader and writer for a checkpoint directory (``dcp_io.py``) come from
:meth:`Storage.writer` and :meth:`Storage.reader`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.core import url_to_fs

from elastic.checkpoint.errors import CheckpointNotFound, storage_error
from elastic.checkpoint.integrity import DIGEST_CHUNK_BYTES, WrittenFile, hash_stream
from elastic.checkpoint.priority import BackgroundPriority
from elastic.files import replace_file

if TYPE_CHECKING:  # torch-bound: imported where a writer or reader is made
    from elastic.checkpoint.dcp_io import CheckpointReader, CheckpointWriter


def relative_to(path: str, base: str) -> str:
    """``path`` relative to ``base`` (both URLs or paths); ``""`` when it is not below it."""
    path, base = path.rstrip("/"), base.rstrip("/")
    if path.startswith(base + "/"):
        return path[len(base) + 1 :]
    # Some backends drop a leading "/" (memory) or add one; compare without it.
    stripped_path, stripped_base = path.lstrip("/"), base.lstrip("/")
    if stripped_path.startswith(stripped_base + "/"):
        return stripped_path[len(stripped_base) + 1 :]
    return ""


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
            rel = relative_to(str(path), base)
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

    def digest(self, rel: str, *, chunk_bytes: int = DIGEST_CHUNK_BYTES) -> WrittenFile:
        """Size, BLAKE3 and ``chunk_bytes`` chunk digests of the stored file ``rel`` (read
        through, not kept in memory)."""
        url = self.join(rel)
        with self._wrapped(f"read {url}"):
            try:
                with self._fs.open(self._path(rel), "rb") as fh:
                    return hash_stream(fh, chunk_bytes=chunk_bytes)
            except FileNotFoundError:
                raise CheckpointNotFound(f"read {url}: not found") from None

    def writer(self, rel_dir: str, *, background_nice: int = 0) -> CheckpointWriter:
        """A DCP storage writer for the checkpoint directory ``rel_dir``; threads other than
        the caller's that use it (an async save's) run at niceness ``background_nice``."""
        from elastic.checkpoint.dcp_io import WRITE_THREADS, CheckpointWriter

        url = self.join(rel_dir)
        with self._wrapped(f"open writer {url}", reading=False):
            # fsync only means something on local disk; elsewhere DCP would fall back to a
            # machine-wide os.sync() per file, which is slow and buys nothing.
            return CheckpointWriter(
                url,
                priority=BackgroundPriority(background_nice),
                single_file_per_rank=True,
                sync_files=self._local,
                thread_count=WRITE_THREADS,
                overwrite=True,
                **self._options,
            )

    def reader(
        self,
        rel_dir: str,
        *,
        files: Mapping[str, int],
        blake3: Mapping[str, str],
        chunks: Mapping[str, Sequence[str]] | None = None,
        chunk_bytes: int = 0,
    ) -> CheckpointReader:
        """A DCP storage reader for the checkpoint directory ``rel_dir`` that opens only
        ``files`` (name -> size_bytes) and checks each against ``chunks`` (name -> BLAKE3 of
        each ``chunk_bytes`` chunk, format 3: streamed, a chunk at a time) or ``blake3`` (name
        -> hex, format 2: read whole first; a file with neither, from a format-1 manifest, is
        checked by size only)."""
        from elastic.checkpoint.dcp_io import CheckpointReader

        url = self.join(rel_dir)
        with self._wrapped(f"open reader {url}"):
            return CheckpointReader(
                url,
                files=files,
                blake3=blake3,
                chunks=chunks or {},
                chunk_bytes=chunk_bytes,
                **self._options,
            )

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


def storage_protocol_problem(url: str) -> str | None:
    """Why fsspec could not open ``url`` here: a protocol it does not know, or one whose package
    is not installed (found without importing it). ``None`` when it can; the storage itself is
    first reached by the workers (a wrong bucket or key shows there)."""
    # A lookup in fsspec's registry: no I/O, and the filesystem's package is not imported
    # (s3fs loads botocore), only found.
    from fsspec.registry import known_implementations, registry
    from fsspec.utils import get_protocol

    chain = url.split("::")
    protocols = [get_protocol(url)] if len(chain) == 1 else [p.split("://")[0] for p in chain]
    for protocol in protocols:
        if protocol in registry:
            continue
        spec = known_implementations.get(protocol)
        if spec is None:
            return (
                f"unknown storage protocol {protocol!r} (fsspec knows file://, s3://, gs://, "
                "az://, memory://... and plain paths)"
            )
        package = str(spec["class"]).split(".", 1)[0]
        if importlib.util.find_spec(package) is None:
            hint = f": {spec['err']}" if spec.get("err") else ""
            return f"storage protocol {protocol!r} needs the package {package!r}{hint}"
    return None
