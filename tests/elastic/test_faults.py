"""Fault injection fires where configured, at most `times` per run, across restarts."""

from __future__ import annotations

import pytest

from elastic.config import ConfigError, build
from elastic.faults import FaultConfig, FaultInjector
from tests.support.fakes import DictRecord


def test_a_fault_fires_once_per_run_even_after_a_restart() -> None:
    record = DictRecord()
    faults = [FaultConfig(kind="kill", step=20, rank=1)]
    first = FaultInjector(faults, rank=1, record=record)
    assert first.due("kill", 19) is None
    assert first.due("kill", 20) is not None
    assert first.due("kill", 20) is None  # a replay of step 20 in the same process
    restarted = FaultInjector(faults, rank=1, record=record)
    assert restarted.due("kill", 20) is None


def test_rank_selection_defaults_to_rank_zero_or_every_rank_by_kind() -> None:
    assert FaultConfig(kind="nan", step=3).fires_on(0)
    assert not FaultConfig(kind="nan", step=3).fires_on(1)
    assert FaultConfig(kind="lr_spike", step=3).fires_on(1)
    assert FaultConfig(kind="kill", step=3, rank=2).fires_on(2)


def test_times_zero_fires_on_every_try() -> None:
    record = DictRecord()
    faults = [FaultConfig(kind="crash_on_start", times=0)]
    for _ in range(5):
        assert FaultInjector(faults, rank=0, record=record).due("crash_on_start") is not None


def test_every_rank_sees_the_count_from_before_any_rank_fired() -> None:
    record = DictRecord()
    faults = [FaultConfig(kind="lr_spike", step=5)]
    rank0, rank1 = (FaultInjector(faults, rank=r, record=record) for r in (0, 1))
    assert rank0.due("lr_spike", 5) is not None
    assert rank1.due("lr_spike", 5) is not None  # rank 0's record must not hide it


def test_bad_fault_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"faults\[0\]\.kind='explode'"):
        build(_Doc, {"faults": [{"kind": "explode"}]})
    with pytest.raises(ConfigError, match=r"faults\[0\]\.times=-1"):
        build(_Doc, {"faults": [{"kind": "kill", "times": -1}]})


def test_slow_fault_needs_a_positive_ms_and_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"faults\[0\]\.ms=0: must be > 0 for kind slow"):
        build(_Doc, {"faults": [{"kind": "slow", "step": 5}]})
    with pytest.raises(ConfigError, match=r"faults\[0\]\.steps=-1"):
        build(_Doc, {"faults": [{"kind": "slow", "step": 5, "ms": 100, "steps": -1}]})
    doc = build(_Doc, {"faults": [{"kind": "slow", "step": 5, "rank": 2, "ms": 300}]})
    assert doc.faults[0].fires_on(2) and not doc.faults[0].fires_on(0)


from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True)
class _Doc:
    faults: tuple[FaultConfig, ...] = ()
