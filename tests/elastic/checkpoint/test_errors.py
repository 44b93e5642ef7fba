from __future__ import annotations

import errno

import botocore.exceptions
import pytest
from torch.distributed.checkpoint.api import CheckpointException

from elastic.checkpoint import (
    CheckpointError,
    CheckpointNotFound,
    StorageError,
    TemporaryStorageError,
)
from elastic.checkpoint.errors import is_temporary, storage_error


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {}}
    response["ResponseMetadata"]["HTTPStatusCode"] = status
    return botocore.exceptions.ClientError(response, "PutObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(),
        TimeoutError(),
        OSError(errno.ETIMEDOUT, "timed out"),
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"),
        _client_error("SlowDown", 503),
        _client_error("Whatever", 500),
    ],
    ids=lambda e: type(e).__name__,
)
def test_network_and_throttling_errors_are_temporary(exc: BaseException) -> None:
    assert is_temporary(exc)
    assert isinstance(storage_error(exc, "op"), TemporaryStorageError)


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(errno.EACCES, "denied"),
        OSError(errno.ENOSPC, "disk full"),
        _client_error("AccessDenied", 403),
        ValueError("bad url"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_errors_are_permanent(exc: BaseException) -> None:
    assert not is_temporary(exc)
    wrapped = storage_error(exc, "op")
    assert type(wrapped) is StorageError
    assert "op:" in str(wrapped)


def test_temporary_cause_deep_in_a_chain_is_found() -> None:
    try:
        try:
            raise botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x")
        except Exception as inner:
            raise OSError(errno.EIO, "wrapped") from inner
    except OSError as outer:
        assert is_temporary(outer)


def test_dcp_checkpoint_exception_failures_are_inspected() -> None:
    exc = CheckpointException("save failed", {1: (ConnectionResetError(), None)})  # type: ignore[dict-item]
    assert is_temporary(exc)


def test_missing_path_is_not_found_when_reading_but_storage_error_when_writing() -> None:
    assert isinstance(storage_error(FileNotFoundError("x"), "read"), CheckpointNotFound)
    assert type(storage_error(FileNotFoundError("x"), "write", reading=False)) is StorageError


def test_hierarchy_has_one_root() -> None:
    for cls in (CheckpointNotFound, StorageError, TemporaryStorageError):
        assert issubclass(cls, CheckpointError)
    assert issubclass(TemporaryStorageError, StorageError)
