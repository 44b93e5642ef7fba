"""The daemon <-> worker channel: heartbeats and control requests through files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from elastic.channel import DaemonChannel, WorkerChannel


def test_heartbeats_carry_step_and_phase_per_local_rank(tmp_path: Path) -> None:
    daemon = DaemonChannel(tmp_path)
    for rank in (0, 1):
        WorkerChannel(str(tmp_path), local_rank=rank, clock=lambda: 5.0).beat(7, "save")
    beats = daemon.heartbeats()
    assert sorted(beats) == [0, 1]
    assert (beats[1].step, beats[1].phase, beats[1].time_unix) == (7, "save", 5.0)


def test_each_control_request_is_seen_once(tmp_path: Path) -> None:
    daemon = DaemonChannel(tmp_path)
    worker = WorkerChannel(str(tmp_path), local_rank=0)
    assert worker.poll() is None
    daemon.send("rewind", to_step=40)
    control = worker.poll()
    assert control is not None and (control.action, control.to_step) == ("rewind", 40)
    assert worker.poll() is None
    daemon.send("drain")
    drained = worker.poll()
    assert drained is not None and drained.action == "drain"


def test_without_a_directory_the_worker_side_is_a_no_op() -> None:
    worker = WorkerChannel(None, local_rank=0)
    worker.beat(1)
    assert worker.poll() is None


def test_unknown_actions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="action='explode'"):
        DaemonChannel(tmp_path).send("explode")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_beats_in_the_same_phase_are_written_at_most_once_per_interval(tmp_path: Path) -> None:
    daemon = DaemonChannel(tmp_path)
    clock = _Clock()
    worker = WorkerChannel(str(tmp_path), local_rank=0, monotonic=clock, min_interval_seconds=0.5)
    worker.beat(1)
    clock.now += 0.2
    worker.beat(2)
    assert daemon.heartbeats()[0].step == 1
    clock.now += 0.3
    worker.beat(3)
    assert daemon.heartbeats()[0].step == 3


def test_a_phase_change_or_a_step_back_is_written_at_once(tmp_path: Path) -> None:
    daemon = DaemonChannel(tmp_path)
    clock = _Clock()
    worker = WorkerChannel(str(tmp_path), local_rank=0, monotonic=clock, min_interval_seconds=60)
    worker.beat(10)
    worker.beat(10, "save")
    assert (daemon.heartbeats()[0].step, daemon.heartbeats()[0].phase) == (10, "save")
    worker.beat(10)
    assert daemon.heartbeats()[0].phase == "train"
    worker.beat(4)  # a rewind to step 4
    assert daemon.heartbeats()[0].step == 4


def test_a_second_request_in_the_same_mtime_tick_is_not_missed(tmp_path: Path) -> None:
    daemon = DaemonChannel(tmp_path)
    worker = WorkerChannel(str(tmp_path), local_rank=0)
    control = tmp_path / "control.json"
    daemon.send("pause")
    mtime_ns = control.stat().st_mtime_ns
    assert worker.poll() is not None
    daemon.send("resume")
    os.utime(control, ns=(mtime_ns, mtime_ns))  # what a coarse file-system clock does
    resumed = worker.poll()
    assert resumed is not None and resumed.action == "resume"


def test_a_beat_publishes_the_mean_compute_time_of_the_steps_since_the_last_one(
    tmp_path: Path,
) -> None:
    daemon = DaemonChannel(tmp_path)
    clock = _Clock()
    worker = WorkerChannel(str(tmp_path), local_rank=0, monotonic=clock, min_interval_seconds=0.5)
    worker.beat(1, compute_seconds=0.1)
    assert daemon.heartbeats()[0].compute_seconds == pytest.approx(0.1)
    for step, seconds in ((2, 0.2), (3, 0.4)):  # rate-limited: kept for the next beat
        clock.now += 0.1
        worker.beat(step, compute_seconds=seconds)
    clock.now += 0.5
    worker.beat(4, compute_seconds=0.6)
    assert daemon.heartbeats()[0].compute_seconds == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    worker.beat(4, "save")  # no step since: no compute time
    assert daemon.heartbeats()[0].compute_seconds is None


def test_a_beat_publishes_the_newest_peak_memory_even_after_rate_limited_beats(
    tmp_path: Path,
) -> None:
    daemon = DaemonChannel(tmp_path)
    clock = _Clock()
    worker = WorkerChannel(str(tmp_path), local_rank=0, monotonic=clock, min_interval_seconds=0.5)
    worker.beat(1, peak_memory_bytes=100)
    assert daemon.heartbeats()[0].peak_memory_bytes == 100
    clock.now += 0.1
    worker.beat(2, peak_memory_bytes=300)  # rate-limited: not written, but kept
    clock.now += 0.5
    worker.beat(3)
    assert daemon.heartbeats()[0].peak_memory_bytes == 300
