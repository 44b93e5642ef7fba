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
    assert decide(obs([4, None], now_unix=1000.0)).kind is Kind.CONTINUE


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
