"""bench/overhead.py's in-process A/B arithmetic."""

from __future__ import annotations

import dataclasses

import pytest

from bench.common import median_interval
from bench.overhead import Estimate, Freeze, Run, estimate, median_gap


def test_median_gap_uses_only_steps_inside_the_window() -> None:
    rows = [{"ts": t} for t in (0.0, 1.0, 1.3, 1.6, 2.5, 2.8, 9.0)]
    # Inside (0.5, 3.0]: 1.0, 1.3, 1.6, 2.5, 2.8 -> gaps 0.3, 0.3, 0.9, 0.3; one slow step ignored.
    assert median_gap(rows, 0.5, 3.0) == pytest.approx(0.3)


def test_each_frozen_window_is_compared_with_both_neighbours() -> None:
    # windows: running 0.30, frozen 0.30, running 0.36, frozen 0.33, running 0.30
    freeze = Freeze(frozen_gap_seconds=[0.30, 0.33], running_gap_seconds=[0.30, 0.36, 0.30])
    assert freeze.ratios() == pytest.approx([0.30 / 0.33, 0.33 / 0.33])


def test_median_interval_is_the_sign_test_interval() -> None:
    # n = 10: [x(1), x(8)] (0-based) holds the median with probability 1 - 2 * 11 / 1024; the
    # next narrower one, [x(2), x(7)], only 1 - 2 * 56 / 1024 = 0.89 < 0.9.
    low, high, coverage = median_interval([9, 0, 8, 1, 7, 2, 6, 3, 5, 4], 0.9)
    assert (low, high) == (1, 8)
    assert coverage == pytest.approx(1 - 22 / 1024)
    # Too few values for the confidence asked: the whole range, at its own coverage.
    assert median_interval([2.0, 1.0, 3.0], 0.9) == (1.0, 3.0, pytest.approx(0.75))


def run(steps_per_second: float, gap_seconds: float) -> Run:
    return Run(steps_per_second=steps_per_second, median_gap_seconds=gap_seconds)


def test_composed_estimate_multiplies_daemon_and_slow_step_ratios() -> None:
    # bare runs: no slow steps (share 1.0) at very different speeds; full runs lose 2% of
    # their window to slow steps whatever their speed.
    runs = {
        "bare": [run(2.0, 0.5), run(4.0, 0.25), run(3.0, 1 / 3)],
        "full": [run(2.94, 1 / 3), run(1.96, 0.5), run(3.92, 0.25)],
    }
    freeze = Freeze(frozen_gap_seconds=[0.30], running_gap_seconds=[0.30, 0.30])
    result = estimate(runs, freeze)
    assert result.slow_step_ratio == pytest.approx(0.98)
    assert result.composed == pytest.approx(0.98)
    assert result.pair_ratios == pytest.approx([1.47, 0.49, 3.92 / 3])
    assert not result.met()  # 0.98 < the 0.99 target
    assert dataclasses.replace(result, slow_step_ratio=0.995).met()


def test_target_is_not_met_when_every_pair_says_slower() -> None:
    result = Estimate(pair_ratios=[0.90, 0.92, 0.93], daemon_ratio=1.0, slow_step_ratio=0.99)
    assert result.composed == pytest.approx(0.99)
    assert not result.met()  # the pairs' interval, 0.90 - 0.93, lies below the target
    slow = Estimate(pair_ratios=[0.95, 1.0, 1.05], daemon_ratio=0.97, slow_step_ratio=0.99)
    assert not slow.met()  # composed 0.960x
