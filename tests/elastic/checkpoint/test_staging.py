"""ReusingStager: staged CPU copies reused across saves, inline or in a worker thread."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from elastic.checkpoint.staging import ReusingStager, source_versions

GATE_TIMEOUT_SECONDS = 30.0


def _state() -> dict[str, Any]:
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "meta": {"lr": 0.1}, "n": 3}


def test_second_stage_copies_into_the_first_stages_buffers() -> None:
    stager = ReusingStager()
    state = _state()
    first = stager.stage(state)
    assert isinstance(first, dict)
    pointer = first["model"]["w"].data_ptr()
    assert pointer != state["model"]["w"].data_ptr()
    state["model"]["w"].add_(10.0)
    second = stager.stage(state)
    assert isinstance(second, dict)
    assert second["model"]["w"].data_ptr() == pointer
    assert torch.equal(second["model"]["w"], state["model"]["w"])
    assert second["meta"] == {"lr": 0.1} and second["n"] == 3
    stager.close()


def test_the_copy_cache_stays_open_between_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.11's DefaultStager closed its StateDictStager after every stage, and the next
    stage raised ``KeyError: <class 'type'>`` (pytorch#183413, seen on an H100): only
    ``ReusingStager.close`` may close it."""
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager

    closed: list[int] = []
    real_close = StateDictStager.close
    monkeypatch.setattr(StateDictStager, "close", lambda self: closed.append(1) or real_close(self))
    stager = ReusingStager()
    state = _state()
    for _ in range(3):
        assert isinstance(stager.stage(state), dict)
    assert closed == []
    stager.close()
    assert closed == [1]


def test_inline_stage_is_a_copy_unaffected_by_later_writes() -> None:
    stager = ReusingStager()
    state = _state()
    staged = stager.stage(state)
    assert isinstance(staged, dict)
    state["model"]["w"].mul_(-1.0)
    assert torch.equal(staged["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert stager.changed == []
    stager.close()


def test_background_stage_reports_tensors_written_during_the_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stager = ReusingStager()
    stager.background = True
    started, gate = threading.Event(), threading.Event()
    original = stager._stager.stage

    def held(state_dict: Any, **kwargs: Any) -> Any:
        started.set()
        assert gate.wait(GATE_TIMEOUT_SECONDS), "test gate never opened"
        return original(state_dict, **kwargs)

    monkeypatch.setattr(stager._stager, "stage", held)
    state = _state()
    future = stager.stage(state)
    assert started.wait(GATE_TIMEOUT_SECONDS)
    state["model"]["w"].add_(1.0)  # the caller broke the contract: no wait() first
    gate.set()
    stager.wait()
    assert not isinstance(future, dict) and future.done()
    assert stager.changed == ["model.w"]
    stager.close()


def test_source_versions_walk_nested_containers() -> None:
    state = {"a": [torch.zeros(1), (torch.ones(1),)], "b": {"c": torch.zeros(2)}, "d": 1}
    before = source_versions(state)
    assert sorted(before) == ["a.0", "a.1.0", "b.c"]
    state["b"]["c"].add_(1.0)
    after = source_versions(state)
    assert [k for k in before if before[k] != after[k]] == ["b.c"]
