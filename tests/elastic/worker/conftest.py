"""Fixtures for the worker API's tests: a one-process gloo group, run files, captured logs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
import torch.distributed as dist

from elastic.checkpoint import Storage
from elastic.worker.recovery import RunFiles
from tests.support.fakes import DictRecord


@pytest.fixture
def gloo() -> Iterator[None]:
    """A one-process gloo group on an in-memory store, destroyed after the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def no_group() -> Iterator[None]:
    """Whatever a test forms (``elastic.worker.init`` does), destroyed after it."""
    assert not dist.is_initialized()
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture
def run_files(tmp_path: Any) -> RunFiles:
    """The run's files beside its checkpoints, on local disk."""
    return RunFiles(Storage(str(tmp_path / "ckpt")), "run")


@pytest.fixture
def record() -> DictRecord:
    return DictRecord()


@pytest.fixture
def log_lines(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The JSON lines printed so far (``elastic.worker.init`` points structlog at the captured
    stdout); structlog's global configuration is reset after the test."""
    seen: list[dict[str, Any]] = []

    def read() -> list[dict[str, Any]]:
        for line in capsys.readouterr().out.splitlines():
            if line.startswith("{"):
                seen.append(json.loads(line))
        return list(seen)

    try:
        yield read
    finally:
        structlog.reset_defaults()
