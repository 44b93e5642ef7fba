"""The daemon <-> worker channel: heartbeats and control requests through files."""

from __future__ import annotations

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
