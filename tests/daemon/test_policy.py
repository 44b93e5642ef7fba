"""Pure supervisor decisions: what a round's observations mean, and the restart budget."""

from __future__ import annotations

import pytest

from daemon.lifecycle import State, TransitionError, next_state
from daemon.policy import Kind, Observation, Reason, RestartBudget, decide


def obs(codes: list[int | None], **kw: object) -> Observation:
    base: dict[str, object] = {
        "exit_codes": codes,
        "last_progress_unix": 100.0,
        "now_unix": 101.0,
        "hang_timeout_seconds": 30.0,
    }
    base.update(kw)
    return Observation(**base)  # type: ignore[arg-type]


def test_running_workers_with_recent_progress_continue() -> None:
    assert decide(obs([None, None])).kind is Kind.CONTINUE


def test_a_worker_killed_by_a_signal_is_a_crash_restart() -> None:
    decision = decide(obs([None, -9]))
    assert (decision.kind, decision.reason) == (Kind.RESTART, Reason.CRASH)


def test_no_progress_past_the_timeout_is_a_hang() -> None:
    decision = decide(obs([None, None], now_unix=131.0))
    assert (decision.kind, decision.reason) == (Kind.RESTART, Reason.HANG)


def test_a_lost_member_restarts_even_when_local_workers_look_healthy() -> None:
    assert decide(obs([None], node_lost=True)).reason is Reason.NODE_LOST


def test_a_peer_failure_stops_local_workers_at_once() -> None:
    decision = decide(obs([None, None], peer_failed=True))
    assert (decision.kind, decision.reason) == (Kind.RESTART, Reason.CRASH)


def test_all_workers_done_is_done_and_drained_workers_regroup_unless_we_drain() -> None:
    assert decide(obs([0, 0])).kind is Kind.DONE
    assert decide(obs([4, 4])).kind is Kind.REGROUP
    assert decide(obs([4, 4], draining=True)).kind is Kind.DRAINED


def test_one_worker_finished_while_the_other_finishes_the_same_step_continues() -> None:
    assert decide(obs([4, None], now_unix=129.0)).kind is Kind.CONTINUE


def test_config_errors_and_divergence_are_not_restarted() -> None:
    assert decide(obs([2, None])).kind is Kind.CONFIG_ERROR
    assert decide(obs([3, 3])).kind is Kind.DIVERGED


def test_restart_budget_refuses_past_the_limit_and_recovers_after_the_window() -> None:
    budget = RestartBudget(max_restarts=2, window_seconds=60)
    assert budget.allow(0.0) and budget.allow(1.0)
    assert not budget.allow(2.0)
    assert budget.allow(70.0)


def test_lifecycle_table_refuses_undocumented_transitions() -> None:
    assert next_state(State.STARTING, State.JOINING) is State.JOINING
    with pytest.raises(TransitionError):
        next_state(State.STOPPED, State.RUNNING)
    with pytest.raises(TransitionError):
        next_state(State.DRAINING, State.RUNNING)


def test_a_draining_node_may_only_stop() -> None:
    assert next_state(State.DRAINING, State.STOPPED) is State.STOPPED
    with pytest.raises(TransitionError):
        next_state(State.DRAINING, State.JOINING)


def test_finishing_wins_over_a_peer_that_finished_first_and_left() -> None:
    assert decide(obs([0, 0], node_lost=True)).kind is Kind.DONE
    assert decide(obs([0, None], node_lost=True, now_unix=105.0)).kind is Kind.CONTINUE


def test_before_any_heartbeat_no_step_progress_is_not_a_hang() -> None:
    quiet = obs([None, None], now_unix=10_000.0, heartbeats_seen=False, silent_seconds=5.0)
    assert decide(quiet).kind is Kind.CONTINUE


def test_before_any_heartbeat_output_silence_past_its_timeout_is_a_hang() -> None:
    silent = obs([None], heartbeats_seen=False, silent_seconds=61.0, silence_timeout_seconds=60.0)
    decision = decide(silent)
    assert (decision.kind, decision.reason) == (Kind.RESTART, Reason.HANG)
    assert "no output for 61.0 s" in decision.detail


def test_output_silence_within_its_timeout_continues() -> None:
    talking = obs([None], heartbeats_seen=False, silent_seconds=59.0, silence_timeout_seconds=60.0)
    assert decide(talking).kind is Kind.CONTINUE


def test_workers_that_never_printed_are_not_judged_by_silence() -> None:
    quiet = obs([None], heartbeats_seen=False, silent_seconds=None, silence_timeout_seconds=5.0)
    assert decide(quiet).kind is Kind.CONTINUE


def test_a_silence_timeout_of_zero_never_fires() -> None:
    silent = obs([None], heartbeats_seen=False, silent_seconds=1e9, silence_timeout_seconds=0.0)
    assert decide(silent).kind is Kind.CONTINUE


def test_once_heartbeats_are_seen_step_progress_decides_and_output_silence_does_not() -> None:
    talking_but_stuck = obs([None], now_unix=131.0, silent_seconds=0.0, silence_timeout_seconds=5)
    assert decide(talking_but_stuck).reason is Reason.HANG
    progressing_but_quiet = obs([None], silent_seconds=1e9, silence_timeout_seconds=5.0)
    assert decide(progressing_but_quiet).kind is Kind.CONTINUE


def test_a_crash_before_any_heartbeat_is_still_a_crash() -> None:
    decision = decide(obs([1, None], heartbeats_seen=False))
    assert (decision.kind, decision.reason) == (Kind.RESTART, Reason.CRASH)


def test_workers_left_running_after_a_peer_finished_are_restarted_once_they_stall() -> None:
    decision = decide(obs([0, None], now_unix=131.0))
    assert (decision.kind, decision.reason) == (Kind.RESTART, Reason.HANG)


def test_a_loop_without_heartbeats_is_stopped_at_once_when_its_node_drains() -> None:
    decision = decide(obs([None, None], heartbeats_seen=False, draining=True))
    assert (decision.kind, decision.reason) == (Kind.DRAINED, Reason.DRAIN)


def test_a_loop_without_heartbeats_is_stopped_at_once_for_a_membership_change() -> None:
    decision = decide(obs([None, None], heartbeats_seen=False, regroup=True))
    assert (decision.kind, decision.reason) == (Kind.REGROUP, Reason.SCALE)


def test_a_loop_with_heartbeats_is_left_to_drain_for_a_membership_change() -> None:
    assert decide(obs([None, None], regroup=True)).kind is Kind.CONTINUE
