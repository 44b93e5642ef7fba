"""The daemon-worker protocol: message shapes round-trip, malformed input is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from elastic.protocol import (
    CLEAN_EXITS,
    Action,
    Control,
    Event,
    ExitCode,
    Heartbeat,
    Phase,
    is_standby_ready,
    parse_line,
    read_standby_order,
    standby_order,
    standby_ready_line,
)


def through_json(payload: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(payload))
    return loaded


def test_heartbeat_survives_a_json_round_trip() -> None:
    beat = Heartbeat(local_rank=3, step=41, phase=Phase.SAVE, time_unix=1700000000.25, pid=1234)
    assert Heartbeat.from_json(3, through_json(beat.to_json())) == beat


def test_heartbeat_compute_seconds_is_optional_on_the_wire() -> None:
    old = {"step": 5, "phase": "train", "time_unix": 1.0, "pid": 9}  # a loop that does not measure
    assert Heartbeat.from_json(0, old).compute_seconds is None
    assert "compute_seconds" not in Heartbeat.from_json(0, old).to_json()
    beat = Heartbeat(0, 5, Phase.TRAIN, 1.0, 9, compute_seconds=0.125)
    assert Heartbeat.from_json(0, through_json(beat.to_json())) == beat


def test_heartbeat_peak_memory_is_optional_on_the_wire() -> None:
    old = {"step": 5, "phase": "train", "time_unix": 1.0, "pid": 9}  # a loop from before it
    assert Heartbeat.from_json(0, old).peak_memory_bytes is None
    assert "peak_memory_bytes" not in Heartbeat.from_json(0, old).to_json()
    beat = Heartbeat(0, 5, Phase.TRAIN, 1.0, 9, peak_memory_bytes=80 << 30)
    assert Heartbeat.from_json(0, through_json(beat.to_json())) == beat


@pytest.mark.parametrize("to_step", [None, 0, 40])
def test_control_survives_a_json_round_trip(to_step: int | None) -> None:
    control = Control(seq=7, action=Action.REWIND, to_step=to_step, time_unix=1700000000.5)
    assert Control.from_json(through_json(control.to_json())) == control


def test_control_without_a_rewind_target_leaves_to_step_out() -> None:
    assert "to_step" not in Control(seq=1, action=Action.DRAIN).to_json()


@pytest.mark.parametrize(
    "data",
    [
        {"phase": "train", "time_unix": 1.0, "pid": 1},  # no step
        {"step": 1, "phase": "sleeping", "time_unix": 1.0, "pid": 1},  # unknown phase
        {"step": "one", "phase": "train", "time_unix": 1.0, "pid": 1},
        {"step": 1, "phase": "train", "time_unix": None, "pid": 1},
    ],
)
def test_malformed_heartbeat_raises(data: dict[str, Any]) -> None:
    with pytest.raises((KeyError, TypeError, ValueError)):
        Heartbeat.from_json(0, data)


@pytest.mark.parametrize(
    "data",
    [
        {"action": "drain"},  # no seq
        {"seq": 1, "action": "explode"},
        {"seq": "first", "action": "drain"},
        {"seq": 1, "action": "rewind", "to_step": "latest"},
    ],
)
def test_malformed_control_raises(data: dict[str, Any]) -> None:
    with pytest.raises((KeyError, TypeError, ValueError)):
        Control.from_json(data)


def test_parse_line_reads_a_json_object_from_str_or_bytes() -> None:
    assert parse_line('  {"event": "step", "step": 3}\n') == {"event": "step", "step": 3}
    assert parse_line(b'{"event": "done"}') == {"event": "done"}


@pytest.mark.parametrize(
    "line",
    ["plain output", "", "[1, 2]", '{"event": "step"', "42", b"\xff\xfe not json"],
)
def test_parse_line_returns_none_for_anything_but_a_json_object(line: str | bytes) -> None:
    assert parse_line(line) is None


def test_standby_order_round_trips_the_environment() -> None:
    env = {"RANK": "1", "ELASTICD_WORKER_DIR": "/tmp/round-3", "EMPTY": ""}
    assert read_standby_order(standby_order(env).decode()) == env


def test_standby_order_is_one_line() -> None:
    assert standby_order({"A": "multi\nline"}).count(b"\n") == 1


def test_closed_stdin_reads_as_no_standby_order() -> None:
    assert read_standby_order("") is None


def test_standby_ready_line_is_recognised() -> None:
    line = standby_ready_line(1.23456)
    assert is_standby_ready(line.encode())
    assert json.loads(line)["warm_up_seconds"] == 1.235
    assert not is_standby_ready(b'{"event": "step"}')
    assert not is_standby_ready(b"standby_ready")


def test_exit_codes_are_distinct_and_as_documented() -> None:
    values = [int(code) for code in ExitCode]
    assert len(set(values)) == len(values)
    assert (ExitCode.OK, ExitCode.CONFIG, ExitCode.DIVERGED, ExitCode.DRAINED) == (0, 2, 3, 4)
    assert ExitCode.FAILED not in CLEAN_EXITS
    assert {ExitCode.OK, ExitCode.DRAINED} == CLEAN_EXITS


def test_event_and_phase_values_are_distinct() -> None:
    for enum in (Event, Phase, Action):
        values = [member.value for member in enum]
        assert len(set(values)) == len(values)
