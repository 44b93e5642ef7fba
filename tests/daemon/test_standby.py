"""The standby handshake: the daemon recognises the ready line a standby worker prints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon import workers
from elastic.channel import is_standby_ready, standby_ready_line
from tests.support.procs import REPO

FAKE_WORKER = """
import sys, time
from elastic.channel import standby_ready_line
print("a warning printed while importing", flush=True)
print('{"event": "something_else"}', flush=True)
time.sleep(float(sys.argv[sys.argv.index("--config") + 1]))
print(standby_ready_line(0.5), flush=True)
sys.stdin.read()
"""


def test_ready_line_round_trips() -> None:
    assert is_standby_ready(standby_ready_line(1.25).encode() + b"\n")
    assert not is_standby_ready(b'{"event": "step"}\n')
    assert not is_standby_ready(b"Traceback (most recent call last):\n")
    assert not is_standby_ready(b"[1, 2]\n")


def _pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delay: str) -> workers.StandbyPool:
    (tmp_path / "fake_worker.py").write_text(FAKE_WORKER)
    monkeypatch.setattr(workers, "WORKER_MODULE", "fake_worker")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    # --config carries the fake's start-up delay (the pool passes its config path there).
    return workers.StandbyPool(config_path=Path(delay), base_env=env, size=2)


def test_wait_ready_sees_the_ready_line_after_other_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _pool(tmp_path, monkeypatch, "0")
    try:
        pool.fill()
        assert pool.wait_ready(2, timeout_seconds=60)
        proc = pool.take()
        assert proc.poll() is None  # warm and still waiting for its env
    finally:
        pool.close()


def test_wait_ready_gives_up_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _pool(tmp_path, monkeypatch, "60")
    try:
        pool.fill()
        assert not pool.wait_ready(1, timeout_seconds=0.5)
    finally:
        pool.close()
