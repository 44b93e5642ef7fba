"""The goodput ledger (daemon/goodput.py): every bucket, lineage reclassification, sum = wall."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from daemon.goodput import (
    Activity,
    Badput,
    Ledger,
    Summary,
    activity_of_phases,
    activity_of_state,
    process_age_seconds,
)
from daemon.lifecycle import State
from daemon.metrics import NodeMetrics
from elastic.protocol import Phase

T0 = 1000.0


def ledger(max_nodes: int = 1) -> Ledger:
    return Ledger(started_seconds=T0, max_nodes=max_nodes)


def train(book: Ledger, *, start: float, steps: range, step_seconds: float = 1.0) -> float:
    """One tick per completed step, ``step_seconds`` apart from ``start``; the end time."""
    now = start
    book.observe(now, Activity.TRAINING)
    for step in steps:
        now += step_seconds
        book.observe(now, Activity.TRAINING, step=step)
    return now


def assert_adds_up(summary: Summary) -> None:
    total = summary.productive_seconds + sum(summary.badput_seconds.values())
    assert math.isclose(total, summary.wall_seconds, rel_tol=1e-9, abs_tol=1e-9)


def test_a_clean_run_is_startup_rendezvous_load_then_productive_steps() -> None:
    book = ledger()
    book.observe(T0 + 2, Activity.RENDEZVOUS)  # process start .. joining: start-up
    book.start_round(T0 + 3, nodes=1)  # joining .. running: rendezvous
    book.observe(T0 + 4, Activity.CHECKPOINT_LOAD)  # workers forming their group: start-up
    end = train(book, start=T0 + 5, steps=range(1, 11))
    book.stop(end)
    s = book.summary(end + 100)  # stopped: the wall clock does not move on
    assert s.wall_seconds == pytest.approx(15.0)
    assert s.productive_seconds == pytest.approx(10.0)
    assert s.badput_seconds[Badput.STARTUP] == pytest.approx(3.0)
    assert s.badput_seconds[Badput.RENDEZVOUS] == pytest.approx(1.0)
    assert s.badput_seconds[Badput.CHECKPOINT_LOAD] == pytest.approx(1.0)
    assert s.ratio == pytest.approx(10 / 15)
    assert_adds_up(s)


def test_several_steps_in_one_tick_share_the_tick_evenly() -> None:
    book = ledger()
    book.observe(T0, Activity.TRAINING)
    book.observe(T0 + 6, Activity.TRAINING, step=3)
    book.observe(T0 + 8, Activity.TRAINING, step=3)  # no new step: pending
    s = book.summary(T0 + 8)
    assert s.productive_seconds == pytest.approx(8.0)  # 6 s in steps + 2 s pending
    assert_adds_up(s)


def test_steps_redone_after_a_crash_move_their_first_computation_to_recompute() -> None:
    book = ledger()
    book.start_round(T0, nodes=1)
    end = train(book, start=T0, steps=range(1, 16))  # steps 1..15 at 1 s each
    end += 0.5  # half of step 16 computed, then the worker crashes
    book.end_round(end, lost_to=Badput.RECOMPUTE)
    book.start_round(end + 1, nodes=1)  # resumed from the checkpoint of step 10
    book.observe(end + 2, Activity.CHECKPOINT_LOAD)
    end = train(book, start=end + 3, steps=range(11, 21), step_seconds=2.0)
    s = book.summary(end)
    # The lost 11..15 (5 s) and the partial step 16 (0.5 s) are recompute; 11..20 at 2 s count.
    assert s.badput_seconds[Badput.RECOMPUTE] == pytest.approx(5.5)
    assert s.productive_seconds == pytest.approx(10 * 1.0 + 10 * 2.0)
    assert_adds_up(s)


def test_a_rewind_within_a_round_is_seen_as_the_step_going_back() -> None:
    book = ledger()
    end = train(book, start=T0, steps=range(1, 31))
    end = train(book, start=end, steps=range(21, 31), step_seconds=3.0)  # rewound to 20
    s = book.summary(end)
    assert s.badput_seconds[Badput.RECOMPUTE] == pytest.approx(10.0)
    assert s.productive_seconds == pytest.approx(20 * 1.0 + 10 * 3.0)
    assert_adds_up(s)


def test_a_new_round_that_reaches_the_old_head_at_its_first_tick_still_counts_as_redone() -> None:
    book = ledger()
    end = train(book, start=T0, steps=range(1, 21))
    book.end_round(end, lost_to=Badput.RECOMPUTE)
    book.start_round(end, nodes=1)
    book.observe(end, Activity.TRAINING)
    book.observe(end + 4, Activity.TRAINING, step=20)  # resumed from 16, redid 17..20 in 4 s
    s = book.summary(end + 4)
    # Detected at step 20 only (one tick): 17..19 keep their first computation (caveat).
    assert s.badput_seconds[Badput.RECOMPUTE] == pytest.approx(1.0)
    assert s.productive_seconds == pytest.approx(19 * 1.0 + 4.0)
    assert_adds_up(s)


def test_a_hang_moves_the_time_since_the_last_step_to_hang_timeout() -> None:
    book = ledger()
    end = train(book, start=T0, steps=range(1, 6))
    book.observe(end + 30, Activity.TRAINING, step=5)  # no progress for 30 s
    book.end_round(end + 30, lost_to=Badput.HANG_TIMEOUT)
    s = book.summary(end + 31)  # then tearing the round down: rendezvous
    assert s.badput_seconds[Badput.HANG_TIMEOUT] == pytest.approx(30.0)
    assert s.badput_seconds[Badput.RENDEZVOUS] == pytest.approx(1.0)
    assert s.productive_seconds == pytest.approx(5.0)
    assert_adds_up(s)


def test_a_clean_round_end_keeps_pending_steps_for_the_next_round() -> None:
    book = ledger()
    end = train(book, start=T0, steps=range(1, 6))
    book.observe(end + 2, Activity.TRAINING)  # steps 6 and 7 done, no tick saw them
    book.end_round(end + 2, lost_to=None)  # drained for a regroup at step 7
    book.start_round(end + 3, nodes=1)
    book.observe(end + 3, Activity.TRAINING)
    book.observe(end + 4, Activity.TRAINING, step=8)
    s = book.summary(end + 4)
    assert s.productive_seconds == pytest.approx(5.0 + 2.0 + 1.0)
    assert s.badput_seconds[Badput.RECOMPUTE] == 0.0
    assert_adds_up(s)


@pytest.mark.parametrize(
    ("activity", "kind"),
    [
        (Activity.PAUSED, Badput.PAUSED),
        (Activity.CHECKPOINT_BLOCKING, Badput.CHECKPOINT_BLOCKING),
        (Activity.CHECKPOINT_LOAD, Badput.CHECKPOINT_LOAD),
        (Activity.OTHER, Badput.OTHER),
    ],
)
def test_time_in_a_non_training_activity_goes_to_its_bucket(
    activity: Activity, kind: Badput
) -> None:
    book = ledger()
    end = train(book, start=T0, steps=range(1, 4))
    book.observe(end, activity, step=3)
    book.observe(end + 7, Activity.TRAINING, step=3)
    s = book.summary(end + 7)
    assert s.badput_seconds[kind] == pytest.approx(7.0)
    assert s.productive_seconds == pytest.approx(3.0)
    assert_adds_up(s)


def test_steps_below_nodes_max_lose_the_missing_nodes_share_to_degraded() -> None:
    book = ledger(max_nodes=4)
    book.start_round(T0, nodes=3)
    end = train(book, start=T0, steps=range(1, 9))
    s = book.summary(end)
    assert s.badput_seconds[Badput.DEGRADED] == pytest.approx(8 * 0.25)
    assert s.productive_seconds == pytest.approx(8 * 0.75)
    assert_adds_up(s)


def test_a_degraded_step_later_redone_keeps_its_degraded_share_so_badput_never_falls() -> None:
    book = ledger(max_nodes=2)
    book.start_round(T0, nodes=1)
    end = train(book, start=T0, steps=range(1, 11))
    degraded_before = book.summary(end).badput_seconds[Badput.DEGRADED]
    end = train(book, start=end, steps=range(6, 11))  # rewound to 5
    s = book.summary(end)
    assert s.badput_seconds[Badput.DEGRADED] >= degraded_before
    assert s.badput_seconds[Badput.RECOMPUTE] == pytest.approx(5 * 0.5)
    assert_adds_up(s)


def test_buckets_add_up_to_wall_through_a_mixed_history() -> None:
    book = ledger(max_nodes=3)
    now = T0
    script = [
        (Activity.RENDEZVOUS, None, 2),
        (Activity.STARTUP, None, 1),
        (Activity.CHECKPOINT_LOAD, None, 1.5),
        *[(Activity.TRAINING, s, 0.3) for s in range(1, 40)],
        (Activity.CHECKPOINT_BLOCKING, 39, 0.7),
        (Activity.PAUSED, 39, 4),
        *[(Activity.TRAINING, s, 0.25) for s in range(31, 50)],
        (Activity.OTHER, 49, 0.1),
    ]
    for activity, step, seconds in script:
        book.observe(now, activity, step=step, nodes=2)
        now += seconds
        assert_adds_up(book.summary(now))
    book.end_round(now, lost_to=Badput.RECOMPUTE)
    book.stop(now + 1)
    s = book.summary(now + 50)
    assert s.wall_seconds == pytest.approx(now + 1 - T0)
    assert all(v >= 0 for v in s.badput_seconds.values())
    assert_adds_up(s)


def test_activity_follows_the_slowest_rank_and_the_lifecycle() -> None:
    assert activity_of_phases(set()) is Activity.STARTUP
    assert activity_of_phases({Phase.TRAIN}) is Activity.TRAINING
    assert activity_of_phases({Phase.TRAIN, Phase.LOAD}) is Activity.CHECKPOINT_LOAD
    assert activity_of_phases({Phase.SAVE, Phase.TRAIN}) is Activity.CHECKPOINT_BLOCKING
    assert activity_of_phases({Phase.PAUSED}) is Activity.PAUSED
    assert activity_of_phases({Phase.EVAL}) is Activity.OTHER
    assert activity_of_state(State.JOINING) is Activity.RENDEZVOUS
    assert activity_of_state(State.WAITING) is Activity.RENDEZVOUS
    assert activity_of_state(State.STARTING) is Activity.STARTUP


def test_summary_json_names_every_badput_kind() -> None:
    body = ledger().summary(T0 + 4).to_json()
    assert set(body["badput_seconds"]) == {k.value for k in Badput}
    assert body["wall_seconds"] == 4.0 and body["ratio"] == 0.0


def test_process_age_is_known_and_small_for_this_process() -> None:
    assert 0.0 < process_age_seconds() < 24 * 3600


def test_metrics_export_the_ledger_and_badput_counters_only_grow() -> None:
    metrics = NodeMetrics(run_id="r", node="n", registry=CollectorRegistry())

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"run_id": "r", "node": "n", **labels})

    assert sample("elasticd_badput_seconds_total", kind="recompute") == 0.0
    metrics.set_goodput(
        wall_seconds=10.0, productive_seconds=6.0, badput_seconds={"recompute": 4.0}
    )
    metrics.set_goodput(
        wall_seconds=12.0, productive_seconds=7.0, badput_seconds={"recompute": 5.0}
    )
    assert sample("elasticd_goodput_ratio") == pytest.approx(7 / 12)
    assert sample("elasticd_goodput_wall_seconds") == 12.0
    assert sample("elasticd_goodput_productive_seconds") == 7.0
    assert sample("elasticd_badput_seconds_total", kind="recompute") == pytest.approx(5.0)


def test_rates_say_where_time_goes_from_now_and_end_with_the_ledger() -> None:
    book = ledger(max_nodes=4)
    book.start_round(T0, nodes=3)
    assert book.summary(T0).rates == {"startup": 1.0}
    book.observe(T0 + 1, Activity.TRAINING)
    assert book.summary(T0 + 1).rates == {"productive": 0.75, "degraded": 0.25}
    book.observe(T0 + 2, Activity.CHECKPOINT_BLOCKING)  # brief: still the training trend
    assert book.summary(T0 + 2).rates == {"productive": 0.75, "degraded": 0.25}
    book.observe(T0 + 3, Activity.PAUSED)
    assert book.summary(T0 + 3).to_json()["rates"] == {"paused": 1.0}
    book.stop(T0 + 4)
    assert book.summary(T0 + 5).rates == {}
