"""Checkpoint errors: one root, specific subclasses, and the temporary-vs-permanent verdict.

Recoverability is a type: :class:`TemporaryStorageError` means "the same call may succeed later"
(a network blip, throttling, a timeout), so the daemon's retry policy can read it without
parsing messages. Everything else is permanent until someone changes something.

:func:`is_temporary` inspects vendor exceptions by class *name* (botocore, aiohttp, s3fs) so
this module imports no storage library; the adapter in ``storage.py`` and the DCP reader and
writer in ``dcp_io.py`` use :func:`storage_error` to wrap what they catch, and ``manager.py``
maps what ``dcp.save``/``dcp.load`` raise (failures gathered from every rank) with
:func:`dcp_error` and :func:`summary`.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)

__all__ = [
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointExists",
    "CheckpointNotFound",
    "CheckpointUntrusted",
    "StagedStateChanged",
    "StorageError",
    "TemporaryStorageError",
    "dcp_error",
    "find_error",
    "is_temporary",
    "storage_error",
    "summary",
]


class CheckpointError(Exception):
    """Root of every error raised by ``elastic.checkpoint``."""


class CheckpointNotFound(CheckpointError):
    """The checkpoint (or file) asked for does not exist."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint or manifest exists but cannot be trusted (bad JSON, missing/short files)."""


class CheckpointUntrusted(CheckpointCorrupt):
    """A file does not match the manifest's digest, or the manifest lacks a valid signature.

    ``file`` names the file (relative to the step directory). Picklable as is: DCP carries a
    rank's error to every rank.
    """

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class CheckpointExists(CheckpointError):
    """A committed checkpoint already holds this step; committed checkpoints are never rewritten."""


class StagedStateChanged(CheckpointError):
    """The caller changed the state while an async save was still copying it (not committed)."""


class StorageError(CheckpointError):
    """The storage backend failed permanently (permissions, bad bucket, bad URL)."""


class TemporaryStorageError(StorageError):
    """The storage backend failed in a way that may succeed on retry (network, throttling)."""


# Vendor exception classes (matched by name anywhere in the MRO) that mean "try again".
_TEMPORARY_TYPE_NAMES = frozenset(
    {
        "HTTPClientError",  # botocore: base of connection-closed / read-timeout errors
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectionError",  # aiohttp
        "ServerDisconnectedError",
        "ClientPayloadError",
        "FSTimeoutError",  # fsspec
        "IncompleteRead",
        "ResponseParserError",
    }
)
# S3 error codes (botocore ClientError) that are throttling or server-side hiccups.
_TEMPORARY_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "500",
        "502",
        "503",
        "504",
    }
)
_TEMPORARY_ERRNOS = frozenset(
    {
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EAGAIN,
        errno.EBUSY,
    }
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes/contexts, each once (vendor adapters wrap several times)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
        # torch's CheckpointException carries per-rank (exception, traceback) pairs.
        failures = getattr(cur, "failures", None)
        if isinstance(failures, dict):
            todo.extend(v[0] for v in failures.values() if isinstance(v, tuple) and v)


def _one_is_temporary(exc: BaseException) -> bool:
    if isinstance(exc, TemporaryStorageError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, StorageError):
        return False
    if {cls.__name__ for cls in type(exc).__mro__} & _TEMPORARY_TYPE_NAMES:
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _TEMPORARY_S3_CODES or status in _TEMPORARY_S3_CODES:
            return True
    return isinstance(exc, OSError) and exc.errno in _TEMPORARY_ERRNOS


def find_error(exc: BaseException, cls: type[E]) -> E | None:
    """The first ``cls`` in ``exc``, its causes, contexts and DCP's per-rank failures."""
    return next((e for e in _chain(exc) if isinstance(e, cls)), None)


def is_temporary(exc: BaseException) -> bool:
    """True when ``exc`` (or anything it wraps) is a retryable network/throttling failure."""
    return any(_one_is_temporary(e) for e in _chain(exc))


def storage_error(exc: BaseException, what: str, *, reading: bool = True) -> CheckpointError:
    """The checkpoint error to raise (``from exc``) for a failed storage operation ``what``.

    A missing path is :class:`CheckpointNotFound` when ``reading``; when writing it means a
    missing bucket or parent, a permanent :class:`StorageError`.
    """
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, FileNotFoundError) and reading:
        return CheckpointNotFound(f"{what}: not found ({exc})")
    cls = TemporaryStorageError if is_temporary(exc) else StorageError
    return cls(f"{what}: {type(exc).__name__}: {exc}")


def summary(exc: BaseException) -> str:
    """One line: the first underlying failure of a (possibly DCP-wrapped) exception."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _) = next(iter(failures.items()))
        return f"rank {rank}: {type(inner).__name__}: {inner}".splitlines()[0][:500]
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def dcp_error(exc: BaseException, what: str) -> CheckpointError:
    """Map a DCP failure: temporary storage, permanent storage (an OSError), or other."""
    if isinstance(exc, CheckpointError):
        return exc
    if is_temporary(exc):
        return TemporaryStorageError(f"{what}: {summary(exc)}")
    failures = getattr(exc, "failures", None)
    inner = [v[0] for v in failures.values()] if isinstance(failures, dict) else [exc]
    if any(isinstance(e, OSError | StorageError) for e in inner):
        return StorageError(f"{what}: {summary(exc)}")
    return CheckpointError(f"{what}: {summary(exc)}")
