"""Fixtures for checkpoint tests: storage backends, captured JSON log lines, toy states."""

from __future__ import annotations

import io
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

import pytest
import structlog
import torch

from elastic import jsonlog
from elastic.checkpoint import CheckpointConfig, CheckpointManager, Storage
from tests.support.s3 import S3Bucket, s3_bucket, s3_server

__all__ = ["s3_bucket", "s3_server"]  # re-exported so pytest finds the fixtures


@dataclass(frozen=True)
class Backend:
    name: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def config(self, **overrides: Any) -> CheckpointConfig:
        return CheckpointConfig(url=self.url, storage_options=self.storage_options, **overrides)

    def storage(self) -> Storage:
        return Storage(self.url, storage_options=self.storage_options)

    def manager(self, run_id: str = "run", **overrides: Any) -> CheckpointManager:
        return CheckpointManager(self.config(**overrides), run_id=run_id, rank=0, world_size=1)


def _memory_backend() -> Backend:
    return Backend("memory", f"memory://ckpt-{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["memory", "file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    """Every storage implementation: in-memory, local disk, a real S3 endpoint (moto_server)."""
    if request.param == "memory":
        made = _memory_backend()
    elif request.param == "file":
        made = Backend("file", (tmp_path / "ckpts").as_uri())
    else:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        made = Backend("s3", f"{bucket.url}/ckpts", bucket.storage_options)
    yield made
    if made.name == "memory":
        made.storage().remove("", recursive=True)  # memory:// is process-global


@pytest.fixture
def local(tmp_path: Any) -> Backend:
    """Local disk: the quickest backend for behaviour that does not depend on storage."""
    return Backend("file", (tmp_path / "ckpts").as_uri())


class _CurrentStdout(io.TextIOBase):
    """Writes to whatever ``sys.stdout`` is now (pytest swaps it between setup and call)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@pytest.fixture
def log_lines(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Configure JSON logging onto captured stdout; call the result to get parsed lines."""
    jsonlog.configure(stream=cast(TextIO, _CurrentStdout()), rank=0)
    seen: list[dict[str, Any]] = []

    def read() -> list[dict[str, Any]]:
        for line in capsys.readouterr().out.splitlines():
            if line.startswith("{"):
                seen.append(json.loads(line))
        return list(seen)

    yield read
    structlog.reset_defaults()


def toy_state(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(3, generator=gen)},
        "rng": torch.get_rng_state(),
        "step": torch.tensor(seed),
    }


def blank_like(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        out[key] = blank_like(value) if isinstance(value, dict) else torch.zeros_like(value)
    return out


def assert_states_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, dict):
            assert_states_equal(got[key], value)
        else:
            assert torch.equal(got[key], value), key
