"""Drills: where each configured fault acts on a loop, once per run."""

from __future__ import annotations

from typing import Any

from elastic.faults import FaultConfig, FaultInjector
from elastic.worker.drills import Drills
from tests.support.fakes import DictRecord


class Log:
    """A structlog stand-in that keeps the warnings."""

    def __init__(self) -> None:
        self.warnings: list[dict[str, Any]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append({"event": event, **fields})


def drills(record: DictRecord, *faults: FaultConfig, rank: int = 0) -> tuple[Drills, Log]:
    log = Log()
    return Drills(FaultInjector(faults, rank=rank, record=record), log=log), log


def test_nan_fires_once_at_its_step(record: DictRecord) -> None:
    d, log = drills(record, FaultConfig(kind="nan", step=3))
    assert [d.nan(step) for step in (1, 2, 3)] == [False, False, True]
    assert not d.nan(3)  # a replay of step 3 (after a rewind) is clean
    assert log.warnings == [{"event": "fault_injected", "kind": "nan", "step": 3}]


def test_a_fired_fault_stays_fired_after_a_restart(record: DictRecord) -> None:
    first, _ = drills(record, FaultConfig(kind="nan", step=3))
    assert first.nan(3)
    restarted, _ = drills(record, FaultConfig(kind="nan", step=3))
    assert not restarted.nan(3)


def test_nan_fires_on_rank_0_unless_a_rank_is_named(record: DictRecord) -> None:
    other, _ = drills(record, FaultConfig(kind="nan", step=3), rank=1)
    assert not other.nan(3)
    named, _ = drills(DictRecord(), FaultConfig(kind="nan", step=3, rank=1), rank=1)
    assert named.nan(3)


def test_lr_factor_multiplies_inside_the_spike_window_only(record: DictRecord) -> None:
    d, log = drills(record, FaultConfig(kind="lr_spike", step=5, factor=10.0, duration_steps=3))
    for step in range(1, 10):
        d.before_step(step)
    assert [d.lr_factor(step) for step in range(3, 10)] == [1, 1, 10, 10, 10, 1, 1]
    assert log.warnings == [{"event": "fault_injected", "kind": "lr_spike", "step": 5}]


def test_overlapping_spikes_multiply(record: DictRecord) -> None:
    d, _ = drills(
        record,
        FaultConfig(kind="lr_spike", step=2, factor=2.0, duration_steps=3),
        FaultConfig(kind="lr_spike", step=3, factor=5.0, duration_steps=1),
    )
    for step in range(1, 6):
        d.before_step(step)
    assert [d.lr_factor(step) for step in range(1, 6)] == [1, 2, 10, 2, 1]


def test_forget_after_drops_the_windows_that_started_later(record: DictRecord) -> None:
    d, _ = drills(record, FaultConfig(kind="lr_spike", step=5, factor=10.0, duration_steps=3))
    for step in range(1, 7):
        d.before_step(step)
    d.forget_after(5)
    assert d.lr_factor(6) == 10  # started at the rewind target: kept
    d.forget_after(4)
    assert d.lr_factor(6) == 1
    for step in range(5, 7):  # the replay: fired once already, so it does not fire again
        d.before_step(step)
    assert d.lr_factor(6) == 1


def test_poison_returns_the_fault_once(record: DictRecord) -> None:
    fault = FaultConfig(kind="poison_batch", step=4, mode="repeat")
    d, log = drills(record, fault)
    assert d.poison(3) is None
    assert d.poison(4) == fault
    assert d.poison(4) is None
    assert [w["kind"] for w in log.warnings] == ["poison_batch"]


def test_every_time_faults_fire_at_each_visit(record: DictRecord) -> None:
    d, _ = drills(record, FaultConfig(kind="nan", step=3, times=0))
    assert [d.nan(3) for _ in range(3)] == [True, True, True]


def test_nothing_fires_without_faults(record: DictRecord) -> None:
    d, log = drills(record)
    d.at_start(0)
    for step in range(1, 5):
        d.before_step(step)
        assert not d.nan(step)
        assert d.poison(step) is None
        assert d.lr_factor(step) == 1
    assert log.warnings == []
    assert record.files == {}


def test_slow_sleeps_inside_each_step_of_its_window_on_its_rank_only(record: DictRecord) -> None:
    slept: list[float] = []
    fault = FaultConfig(kind="slow", step=3, rank=1, ms=250, steps=2)
    d = Drills(FaultInjector([fault], rank=1, record=record), log=Log(), sleep=slept.append)
    for step in range(1, 7):
        d.before_step(step)
        d.in_step(step)
    assert slept == [0.25, 0.25]  # steps 3 and 4
    other = Drills(
        FaultInjector([fault], rank=0, record=DictRecord()), log=Log(), sleep=slept.append
    )
    for step in range(1, 7):
        other.before_step(step)
        other.in_step(step)
    assert slept == [0.25, 0.25]


def test_slow_without_steps_lasts_to_the_end_and_is_logged_once(record: DictRecord) -> None:
    slept: list[float] = []
    log = Log()
    fault = FaultConfig(kind="slow", step=2, ms=100)
    d = Drills(FaultInjector([fault], rank=0, record=record), log=log, sleep=slept.append)
    for step in range(1, 101):
        d.before_step(step)
        d.in_step(step)
    assert len(slept) == 99 and log.warnings == [
        {"event": "fault_injected", "kind": "slow", "step": 2}
    ]
