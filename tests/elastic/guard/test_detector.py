"""Rolling robust statistics: median / MAD, the floor, warmup, dropping samples."""

from __future__ import annotations

import pytest

from elastic.guard.detector import LossAverage, RollingWindow, Sample, robust_stats


def test_robust_stats_are_median_and_scaled_mad() -> None:
    stats = robust_stats([1.0, 2.0, 3.0, 4.0, 100.0], floor_fraction=0.0)
    assert stats.median == 3.0
    assert stats.sigma == pytest.approx(1.4826 * 1.0)


def test_sigma_has_a_floor_relative_to_the_median() -> None:
    stats = robust_stats([2.0] * 10, floor_fraction=0.01)
    assert stats.sigma == pytest.approx(0.02)
    assert stats.z(2.12) == pytest.approx(6.0)


def test_constant_zero_window_keeps_z_finite() -> None:
    stats = robust_stats([0.0] * 4, floor_fraction=0.01)
    assert stats.sigma > 0
    assert stats.z(1.0) > 1e9


def test_window_is_silent_until_warm() -> None:
    window = RollingWindow(window_steps=8, floor_fraction=0.0)
    for step in range(3):
        window.add(Sample(step, 1.0 + step, 1.0))
    assert not window.read(loss=99.0, grad_norm=1.0, warmup_steps=4).armed
    window.add(Sample(3, 4.0, 1.0))
    reading = window.read(loss=99.0, grad_norm=1.0, warmup_steps=4)
    assert reading.armed and reading.loss_z is not None and reading.loss_z > 50


def test_window_keeps_the_newest_samples_and_drops_an_abandoned_stretch() -> None:
    window = RollingWindow(window_steps=4, floor_fraction=0.0)
    for step in range(6):
        window.add(Sample(step, float(step), 1.0))
    assert [s.step for s in window.samples()] == [2, 3, 4, 5]
    window.drop_from(4)
    assert [s.step for s in window.samples()] == [2, 3]


def test_loss_average_marks_the_start_of_an_elevated_stretch() -> None:
    average = LossAverage(ema_steps=1)  # alpha = 1: the average is the last loss
    average.update(1.0)
    assert not average.judge(10, baseline=1.0, ratio=1.1)
    average.update(1.2)
    assert average.judge(11, baseline=1.0, ratio=1.1)
    average.update(1.3)
    assert average.judge(12, baseline=1.0, ratio=1.1)
    assert average.elevated_since == 11
    average.update(1.0)
    assert not average.judge(13, baseline=1.0, ratio=1.1)
    assert average.elevated_since is None
