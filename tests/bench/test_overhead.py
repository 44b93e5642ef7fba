"""bench/overhead.py's in-process A/B arithmetic."""

from __future__ import annotations

import pytest

from bench.overhead import Freeze, median_gap


def test_median_gap_uses_only_steps_inside_the_window() -> None:
    rows = [{"ts": t} for t in (0.0, 1.0, 1.3, 1.6, 2.5, 2.8, 9.0)]
    # Inside (0.5, 3.0]: 1.0, 1.3, 1.6, 2.5, 2.8 -> gaps 0.3, 0.3, 0.9, 0.3; one slow step ignored.
    assert median_gap(rows, 0.5, 3.0) == pytest.approx(0.3)


def test_each_frozen_window_is_compared_with_both_neighbours() -> None:
    # windows: running 0.30, frozen 0.30, running 0.36, frozen 0.33, running 0.30
    freeze = Freeze(frozen_gap_seconds=[0.30, 0.33], running_gap_seconds=[0.30, 0.36, 0.30])
    assert freeze.ratios() == pytest.approx([0.30 / 0.33, 0.33 / 0.33])
