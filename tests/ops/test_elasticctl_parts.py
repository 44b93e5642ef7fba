"""elasticctl's pure parts: human-readable cells, when a request counts as applied, the bounded
wait (with a fake clock: nothing sleeps), flags in any position, --version."""

from __future__ import annotations

from typing import Any

import pytest

from elastic.rendezvous.records import RoundRecord
from elastic.version import package_version
from ops import human, waiting
from ops.cli import _parser, check_args
from ops.status_view import eta_seconds, newest_checkpoint, render, run_rows


# ----------------------------------------------------------------- human cells
@pytest.mark.parametrize(
    ("size_bytes", "text"),
    [
        (None, ""),
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (5 * 2**20, "5.0 MiB"),
        (3 * 2**30 + 2**29, "3.5 GiB"),
    ],
)
def test_sizes_are_binary_units_with_one_decimal(size_bytes: int | None, text: str) -> None:
    assert human.size(size_bytes) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (59, "59s"), (192, "3m 12s"), (3600, "1h"), (3725, "1h 2m"), (93784, "1d 2h")],
)
def test_durations_show_the_two_largest_units(seconds: float, text: str) -> None:
    assert human.duration(seconds) == text


def test_ages_say_ago_and_unknown_values_stay_blank() -> None:
    assert human.age(1000.0, now_unix=1192.0) == "3m 12s ago"
    assert human.age(1000.0, now_unix=999.0) == "just now"  # a peer's clock ahead of ours
    assert human.age(None, now_unix=1.0) == ""
    assert (human.yes_no(True), human.yes_no(False), human.yes_no(None)) == ("yes", "no", "")


# ----------------------------------------------------------------- status derivations
def test_eta_needs_a_total_and_a_step_time_and_is_never_made_up() -> None:
    train = {"step": 1200, "total_steps": 10000, "step_seconds": 0.5}
    assert eta_seconds({"last_step": 1100, "train": train}) == 4400.0
    assert eta_seconds({"last_step": 1100, "train": {**train, "total_steps": None}}) is None
    assert eta_seconds({"last_step": 1100, "train": {"step": 1200}}) is None
    assert eta_seconds({"last_step": 5}) is None


def test_the_newest_checkpoint_commit_event_gives_the_checkpoint_age() -> None:
    events = [
        {"seq": 1, "event": "checkpoint_commit", "step": 100, "ts": 10.0},
        {"seq": 2, "event": "checkpoint_commit", "step": 200, "ts": 20.0},
        {"seq": 3, "event": "rewind", "to_step": 100, "ts": 30.0},
    ]
    assert newest_checkpoint(events) == {"step": 200, "time_unix": 20.0}
    assert newest_checkpoint(events[2:]) is None


def test_the_status_table_leaves_unpublished_numbers_blank() -> None:
    rows = dict(run_rows({"state": "running", "round": 2, "last_step": 7}, now_unix=100.0))
    assert (rows["state"], rows["step"]) == ("running", "7")
    assert rows["loss"] == rows["tokens/s"] == rows["eta"] == rows["checkpoint"] == ""


def test_the_status_table_shows_progress_eta_and_ages() -> None:
    status = {
        "last_step": 1200,
        "train": {
            "step": 1200,
            "total_steps": 10000,
            "loss": 2.71828,
            "step_seconds": 0.5,
            "tokens_per_s": 123456.7,
            "time_unix": 88.0,
        },
        "last_checkpoint": {"step": 1100, "time_unix": 100.0 - 192},
        "eta_seconds": 4400.0,
    }
    rows = dict(run_rows(status, now_unix=100.0))
    assert rows["step"] == "1200 / 10000 (12.0%)"
    assert rows["eta"] == "1h 13m (at the newest step's pace)"
    assert rows["loss"] == "2.718 (12s ago)" and rows["tokens/s"] == "123457 (12s ago)"
    assert rows["checkpoint"] == "step 1100, 3m 12s ago"
    assert "2.718 (12s ago)" in render(status, now_unix=100.0)


# ----------------------------------------------------------------- --wait conditions
def ev(seq: int, event: str, **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "event": event, **fields}


def test_pause_is_applied_when_the_newest_pause_event_is_paused() -> None:
    assert not waiting.pause_applied([]).done
    assert not waiting.pause_applied([ev(1, "paused", step=3), ev(2, "resumed", step=3)]).done
    applied = waiting.pause_applied([ev(1, "resumed"), ev(4, "paused", step=9), ev(5, "state")])
    assert applied.done and applied.detail == "paused at step 9"


def test_resume_is_applied_when_nothing_holds() -> None:
    assert waiting.resume_applied([]).done
    assert waiting.resume_applied([ev(1, "paused", step=3), ev(2, "resumed", step=3)]).done
    held = waiting.resume_applied([ev(2, "resumed"), ev(3, "paused", step=4)])
    assert not held.done and held.detail == "still paused at step 4"


def test_rewind_counts_only_events_after_the_request_and_a_refusal_fails_at_once() -> None:
    old = [ev(3, "rewind", to_step=10)]
    assert not waiting.rewind_applied(old, after_seq=5, to_step=10).done
    other = [ev(6, "rewind", to_step=20)]
    assert not waiting.rewind_applied(other, after_seq=5, to_step=10).done
    assert waiting.rewind_applied([ev(7, "rewind", to_step=10)], after_seq=5, to_step=10).done
    refused = waiting.rewind_applied(
        [ev(7, "rewind_refused", to_step=10, reason="no such checkpoint")], after_seq=5, to_step=10
    )
    assert refused.failed and not refused.done
    assert refused.detail == "refused: no such checkpoint"


def round_record(number: int, *, closed: bool, bounds: tuple[int, int]) -> RoundRecord:
    if not closed:
        return RoundRecord(number, "open", "a", *bounds)
    return RoundRecord(number, "closed", "a", *bounds, ("a", "b"), "127.0.0.1", 29500)


def test_scale_is_applied_when_a_round_formed_under_the_new_bounds() -> None:
    def check(record: RoundRecord | None) -> waiting.Progress:
        return waiting.scale_applied(record, min_nodes=1, max_nodes=1, live_nodes=2)

    assert not check(None).done
    old = check(round_record(4, closed=True, bounds=(1, 2)))
    assert not old.done and "still runs under min 1, max 2" in old.detail
    forming = check(round_record(5, closed=False, bounds=(1, 1)))
    assert not forming.done and "round 5 is forming" in forming.detail
    assert check(round_record(5, closed=True, bounds=(1, 1))).done


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_wait_polls_until_applied_and_gives_up_at_the_deadline() -> None:
    clock = FakeClock()
    answers = iter([waiting.Progress(False, "a"), waiting.Progress(True, "b")])
    done = waiting.wait(lambda: next(answers), timeout_seconds=5, clock=clock, sleep=clock.sleep)
    assert done.done and clock.slept == [waiting.POLL_SECONDS]

    clock = FakeClock()
    late = waiting.wait(
        lambda: waiting.Progress(False, "still"), timeout_seconds=2, clock=clock, sleep=clock.sleep
    )
    assert not late.done and late.detail == "still" and clock.now == 2.0


def test_wait_stops_at_a_failure_without_waiting_for_the_deadline() -> None:
    clock = FakeClock()
    failed = waiting.wait(
        lambda: waiting.Progress(False, "refused", failed=True),
        timeout_seconds=60,
        clock=clock,
        sleep=clock.sleep,
    )
    assert failed.failed and clock.slept == []


# ----------------------------------------------------------------- flags anywhere
@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "job.yaml", "--run-id", "r", "-o", "json", "status"],
        ["status", "--config", "job.yaml", "--run-id", "r", "-o", "json"],
        ["--config", "job.yaml", "status", "--run-id", "r", "--json"],
    ],
)
def test_global_flags_are_taken_before_or_after_the_command(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert (args.command, args.config, args.run_id, args.output) == (
        "status",
        "job.yaml",
        "r",
        "json",
    )


def test_a_flag_after_the_command_overrides_the_same_flag_before_it() -> None:
    args = _parser().parse_args(["--run-id", "before", "pause", "--run-id", "after", "--wait"])
    assert (args.run_id, args.wait, args.etcd) == ("after", True, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "--interval", "0"], "--interval=0.0: must be > 0 seconds"),
        (["status", "--count", "2"], "--count=2: must be >= 1, with -w/--watch"),
        (["status", "-w", "--count", "0"], "--count=0: must be >= 1"),
        (["pause", "--wait", "--timeout", "-1"], "--timeout=-1.0: must be > 0 seconds"),
        (["events", "--limit", "-3"], "--limit=-3: must be >= 0"),
    ],
)
def test_out_of_range_numbers_name_the_flag_and_value(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_args(_parser().parse_args(argv))


def test_the_package_version_falls_back_to_unknown() -> None:
    assert package_version("no-such-distribution-here") == "unknown"
    assert package_version() != ""
