"""Async-save threads run at a higher niceness than the trainer; sync saves do not touch it."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from torch.distributed.checkpoint import _fsspec_filesystem

from elastic.checkpoint.priority import BackgroundPriority
from tests.elastic.checkpoint.conftest import Backend, toy_state

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")


def this_thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def target_nice() -> int:
    """A niceness above this process's own (CI may already run it niced)."""
    base = this_thread_nice()
    if base > 14:
        pytest.skip(f"the test process already runs at niceness {base}")
    return base + 5


def in_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return out[0]


def test_only_threads_other_than_the_owner_are_lowered() -> None:
    base, nice = this_thread_nice(), target_nice()
    priority = BackgroundPriority(nice)
    priority.apply()  # in the owner (the trainer's thread): no change
    assert this_thread_nice() == base

    def lowered_then_child() -> tuple[int, int]:
        priority.apply()
        return this_thread_nice(), in_thread(this_thread_nice)  # a thread it starts inherits

    assert in_thread(lowered_then_child) == (nice, nice)
    assert this_thread_nice() == base
    assert in_thread(lambda: (BackgroundPriority(0).apply(), this_thread_nice())[1]) == base


def record_write_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(thread ident, niceness) of each DCP write_data call, seen below our writer."""
    seen: list[tuple[int, int]] = []
    original = _fsspec_filesystem.FsspecWriter.write_data

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        seen.append((threading.get_ident(), this_thread_nice()))
        return original(self, plan, planner)

    monkeypatch.setattr(_fsspec_filesystem.FsspecWriter, "write_data", write_data)
    return seen


@pytest.mark.parametrize("async_save", [True, False])
def test_async_writes_run_niced_and_sync_writes_do_not(
    local: Backend, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    base, nice = this_thread_nice(), target_nice()
    seen = record_write_threads(monkeypatch)
    manager = local.manager(async_save=async_save, background_nice=nice)
    state = toy_state(1)
    manager.save(1, state, meta={})
    manager.wait()
    manager.close()
    assert len(seen) == 1
    thread, niceness = seen[0]
    if async_save:
        assert thread != threading.get_ident()
        assert niceness == nice
    else:
        assert (thread, niceness) == (threading.get_ident(), base)
    assert this_thread_nice() == base  # the trainer's thread is never lowered
