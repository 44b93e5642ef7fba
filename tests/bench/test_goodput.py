"""bench/goodput.py: the goodput simulation's accounting, checked against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import goodput
from bench.goodput import Costs, Cycle, Failure, Inputs, Ledger, simulate


def costs(**overrides: float | bool) -> Costs:
    fields: dict = {
        "num_gpus": 32,
        "job_mtbf_seconds": 1e9,
        "blocking_seconds": 10.0,
        "commit_lag_seconds": 5.0,
        "software_restart_seconds": 20.0,
        "hardware_restart_seconds": 50.0,
    }
    return Costs(**{**fields, **overrides})


def software(at_seconds: float, restart_draw: float = 0.0) -> Failure:
    return Failure(at_seconds, hardware=False, restart_draw=restart_draw)


def hardware(at_seconds: float) -> Failure:
    return Failure(at_seconds, hardware=True, restart_draw=0.0)


def assert_buckets_fill_the_horizon(ledger: Ledger) -> None:
    spent = ledger.kept_seconds + sum(ledger.shares().values()) * ledger.horizon_seconds
    assert spent == pytest.approx(ledger.horizon_seconds)


def test_without_failures_ettr_is_one_minus_the_checkpoint_share() -> None:
    cycle = Cycle(interval_seconds=98.0, blocking_seconds=2.0, commit_lag_seconds=30.0)
    ledger = simulate(costs(), cycle, [], horizon_seconds=50 * 100.0)
    assert ledger.ettr == pytest.approx(1 - 2.0 / 100.0, abs=1e-12)
    assert ledger.blocking_seconds == pytest.approx(50 * 2.0)
    assert ledger.lost_seconds == ledger.down_seconds == 0.0


def test_lost_work_runs_back_to_the_newest_committed_checkpoint() -> None:
    # Period 110 s: compute 100, block 10; committed 5 s after the block ends.
    cycle = Cycle(interval_seconds=100.0, blocking_seconds=10.0, commit_lag_seconds=5.0)
    failures = [software(250.0), hardware(382.0)]
    ledger = simulate(costs(), cycle, failures, horizon_seconds=1000.0)
    # Crash at 250: compute 100 + 100 + 30, two checkpoints committed (at 115, 225): 30 lost.
    # Back at 270. Node lost at 382 (112 s in): 102 computed; the checkpoint of the first 100
    # stopped blocking at 380 but commits only at 385: all 102 lost. Back at 432, then 568 s
    # to the horizon: 518 computed (5 periods + 18), kept.
    assert ledger.lost_seconds == pytest.approx(30.0 + 102.0)
    assert ledger.down_seconds == pytest.approx(20.0 + 50.0)
    assert ledger.blocking_seconds == pytest.approx(20.0 + 10.0 + 50.0)
    assert ledger.kept_seconds == pytest.approx(200.0 + 0.0 + 518.0)
    assert ledger.ettr == pytest.approx(0.718)
    assert ledger.failures == 2
    assert_buckets_fill_the_horizon(ledger)


def test_a_failure_while_down_restarts_the_recovery_and_loses_no_work() -> None:
    cycle = Cycle(interval_seconds=100.0, blocking_seconds=0.0, commit_lag_seconds=0.0)
    ledger = simulate(costs(), cycle, [software(150.0), software(160.0)], horizon_seconds=400.0)
    assert ledger.lost_seconds == pytest.approx(50.0)  # only the first one
    assert ledger.down_seconds == pytest.approx(160.0 + 20.0 - 150.0)
    assert ledger.kept_seconds == pytest.approx(100.0 + 400.0 - 180.0)


def test_a_failed_restart_adds_the_relaunch() -> None:
    cycle = Cycle(interval_seconds=100.0, blocking_seconds=0.0, commit_lag_seconds=0.0)
    flaky = costs(restart_success=0.6, failed_restart_seconds=300.0)
    works = simulate(flaky, cycle, [software(100.0, 0.59)], horizon_seconds=1000.0)
    fails = simulate(flaky, cycle, [software(100.0, 0.6)], horizon_seconds=1000.0)
    assert works.down_seconds == pytest.approx(20.0)
    assert fails.down_seconds == pytest.approx(320.0)


def test_a_node_short_runs_slower_until_its_replacement_is_resized_in() -> None:
    cycle = Cycle(interval_seconds=100.0, blocking_seconds=0.0, commit_lag_seconds=0.0)
    elastic = costs(
        hardware_restart_seconds=10.0,
        elastic=True,
        node_fraction=0.25,
        replacement_seconds=100.0,
        resize_pause_seconds=10.0,
    )
    ledger = simulate(elastic, cycle, [hardware(150.0)], horizon_seconds=400.0)
    # Lost 50 at 150; back at 160 at 3/4 speed; the node arrives at 250 and a 10 s resize
    # (drain checkpoint: nothing lost) brings it back; full speed from 260.
    assert ledger.lost_seconds == pytest.approx(50.0)
    assert ledger.degraded_seconds == pytest.approx(0.25 * 90.0)
    assert ledger.resize_seconds == pytest.approx(10.0)
    assert ledger.kept_seconds == pytest.approx(100.0 + 0.75 * 90.0 + 140.0)
    assert_buckets_fill_the_horizon(ledger)


def test_a_failure_during_a_resize_loses_nothing_the_drain_committed() -> None:
    cycle = Cycle(interval_seconds=100.0, blocking_seconds=0.0, commit_lag_seconds=0.0)
    elastic = costs(
        hardware_restart_seconds=10.0,
        elastic=True,
        node_fraction=0.25,
        replacement_seconds=100.0,
        resize_pause_seconds=10.0,
    )
    failures = [hardware(150.0), software(255.0)]
    ledger = simulate(elastic, cycle, failures, horizon_seconds=400.0)
    # The resize starts at 250 (all 90 s since 160 committed by the drain); the crash at 255
    # restarts from there: back at 275, the new node in.
    assert ledger.lost_seconds == pytest.approx(50.0)
    assert ledger.resize_seconds + ledger.down_seconds == pytest.approx(10.0 + 25.0)
    assert ledger.kept_seconds == pytest.approx(100.0 + 0.75 * 90.0 + 125.0)
    assert_buckets_fill_the_horizon(ledger)


def test_a_replacement_not_worth_a_resize_waits_for_the_next_restart() -> None:
    cycle = Cycle(interval_seconds=100.0, blocking_seconds=0.0, commit_lag_seconds=0.0)
    elastic = costs(
        job_mtbf_seconds=1.0,  # a restart is due soon: a resize is not worth its pause
        hardware_restart_seconds=10.0,
        elastic=True,
        node_fraction=0.25,
        replacement_seconds=100.0,
        resize_pause_seconds=10.0,
    )
    failures = [hardware(150.0), software(300.0)]
    ledger = simulate(elastic, cycle, failures, horizon_seconds=400.0)
    # Short of the node from 160 until the crash at 300; it joins that restart (back at 320).
    assert ledger.resize_seconds == 0.0
    assert ledger.degraded_seconds == pytest.approx(0.25 * 140.0)
    assert ledger.kept_seconds == pytest.approx(100.0 + 0.75 * 100.0 + 80.0)
    assert_buckets_fill_the_horizon(ledger)


def test_young_and_daly_intervals() -> None:
    assert goodput.young_interval_seconds(0.5, 10_000.0) == pytest.approx(100.0)
    # delta / 2M = 1e-4: sqrt(2 delta M) * (1 + 0.01 / 3 + 1e-4 / 9) - delta
    expected = 200.0 * (1 + 0.01 / 3 + 1e-4 / 9) - 2.0
    assert goodput.daly_interval_seconds(2.0, 10_000.0) == pytest.approx(expected)
    assert goodput.daly_interval_seconds(30.0, 10.0) == 10.0  # delta >= 2M: checkpoint each M


def test_dalys_interval_is_near_the_best_for_the_closed_form() -> None:
    c = goodput.elasticd_costs(Inputs(), 16384)
    best = goodput.cycle_for(c)

    def ettr(interval: float) -> float:
        cycle = Cycle(interval, c.blocking_seconds, c.commit_lag_seconds)
        return goodput.closed_form_ettr(c, cycle, hardware_fraction=0.78)

    assert ettr(best.interval_seconds) > ettr(0.7 * best.interval_seconds)
    assert ettr(best.interval_seconds) > ettr(1.4 * best.interval_seconds)


def test_failure_schedule_follows_llama3_rate_and_hardware_share() -> None:
    inputs = Inputs()
    rng = np.random.default_rng(1)
    horizon = inputs.llama3_days * goodput.DAY_SECONDS
    schedules = [
        goodput.failure_schedule(rng, num_gpus=16384, horizon_seconds=horizon, inputs=inputs)
        for _ in range(20)
    ]
    counts = [len(s) for s in schedules]
    assert np.mean(counts) == pytest.approx(419, abs=15)  # sd of the mean of 20: ~4.6
    share = sum(f.hardware for s in schedules for f in s) / sum(counts)
    assert share == pytest.approx(0.78, abs=0.02)
    assert all(s == sorted(s, key=lambda f: f.at_seconds) for s in schedules)


def test_ettr_falls_as_the_job_grows_for_both_systems() -> None:
    rows = goodput.run_all(trials=4, days=10.0, seed=3)
    for system in ("elasticd", "torchrun"):
        means = [r.mean for r in rows if r.system == system]
        assert means == sorted(means, reverse=True)
        assert len(set(means)) == len(goodput.SCALES_GPUS)


def test_the_simulation_is_deterministic_for_a_seed() -> None:
    first = goodput.run_scale(Inputs(), 4096, trials=3, days=5.0, seed=7)
    again = goodput.run_scale(Inputs(), 4096, trials=3, days=5.0, seed=7)
    other = goodput.run_scale(Inputs(), 4096, trials=3, days=5.0, seed=8)
    assert [r.ettr for r in first] == [r.ettr for r in again]
    assert [r.ettr for r in first] != [r.ettr for r in other]


def test_closed_form_agrees_with_the_simulation() -> None:
    for row in goodput.run_scale(Inputs(), 16384, trials=8, days=30.0, seed=0):
        assert math.isclose(row.mean, row.closed_form, abs_tol=0.005), row.system


def test_random_runs_account_for_every_second() -> None:
    inputs = Inputs()
    horizon = 10 * goodput.DAY_SECONDS
    rng = np.random.default_rng(5)
    failures = goodput.failure_schedule(rng, num_gpus=16384, horizon_seconds=horizon, inputs=inputs)
    for c in (goodput.elasticd_costs(inputs, 16384), goodput.torchrun_costs(inputs, 16384)):
        ledger = simulate(c, goodput.cycle_for(c), failures, horizon_seconds=horizon)
        assert ledger.failures == len(failures)
        assert 0 < ledger.ettr < 1
        assert_buckets_fill_the_horizon(ledger)


def test_cli_prints_the_tables_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "goodput.json"
    assert goodput.main(["--trials", "2", "--days", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 16,384 | elasticd |" in printed
    stored = json.loads(out.read_text())
    assert [t["name"] for t in stored["targets"]] == [
        "ETTR at 4,096 GPUs (simulated)",
        "ETTR at 16,384 GPUs (simulated)",
    ]
    assert len(stored["data"]["rows"]) == 2 * len(goodput.SCALES_GPUS)


def test_cli_rejects_a_bad_trial_count() -> None:
    with pytest.raises(SystemExit) as exit_info:
        goodput.main(["--trials", "0"])
    assert exit_info.value.code == 2
