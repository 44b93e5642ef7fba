"""Straggler detection (daemon/stragglers.py): pure decisions on published compute times."""

from __future__ import annotations

import random

import pytest

from daemon.stragglers import (
    STATUS_KEY,
    ComputeWindow,
    StragglerDetector,
    StragglersConfig,
    StragglerWatch,
    peer_values,
    score,
)
from elastic.config import ConfigError, build
from elastic.protocol import Heartbeat, Phase

FACTOR, WINDOW = 1.5, 10.0


def detector() -> StragglerDetector:
    return StragglerDetector(factor=FACTOR, window_seconds=WINDOW)


def beat(rank: int, compute: float | None, time_unix: float) -> Heartbeat:
    return Heartbeat(rank, 1, Phase.TRAIN, time_unix, 100 + rank, compute)


def test_a_clear_outlier_is_flagged_only_after_the_window() -> None:
    d = detector()
    flags = [d.observe(0.5, [0.2, 0.21, 0.19], now=t).straggler for t in range(0, 12)]
    assert flags == [False] * 10 + [True] * 2
    assert d.observe(0.5, [0.2, 0.21, 0.19], now=12).changed is False


def test_the_verdict_flips_once_with_the_score_of_the_node() -> None:
    d = detector()
    d.observe(0.5, [0.2, 0.2], now=0.0)
    verdict = d.observe(0.5, [0.2, 0.2], now=WINDOW)
    assert verdict.straggler and verdict.changed and verdict.slow_seconds == WINDOW
    assert verdict.score is not None
    assert verdict.score.ratio == pytest.approx(2.5)
    assert verdict.score.num_nodes == 3


def test_noise_across_nodes_is_never_flagged() -> None:
    rng = random.Random(7)
    d = detector()
    for t in range(200):
        values = [0.2 * rng.uniform(0.8, 1.2) for _ in range(8)]
        assert not d.observe(values[0], values[1:], now=float(t)).straggler


def test_a_slow_spell_shorter_than_the_window_is_not_flagged() -> None:
    d = detector()
    for t in range(9):
        assert not d.observe(0.5, [0.2, 0.2], now=float(t)).straggler
    d.observe(0.2, [0.2, 0.2], now=9.0)  # back to normal: the spell restarts from zero
    for t in range(10, 19):
        assert not d.observe(0.5, [0.2, 0.2], now=float(t)).straggler


def test_noise_around_the_factor_neither_restarts_the_window_nor_clears_the_flag() -> None:
    d = detector()
    ratios = [2.0, 1.3, 2.0, 1.4, 2.0, 1.3, 2.0, 1.3, 2.0, 1.3, 2.0, 1.3, 1.4]
    flags = [d.observe(0.2 * r, [0.2, 0.2], now=float(t)).straggler for t, r in enumerate(ratios)]
    assert flags == [False] * 10 + [True] * 3
    assert not d.observe(0.2 * 1.2, [0.2, 0.2], now=13.0).straggler  # below 1.25: recovered


def test_a_node_only_above_the_band_floor_never_starts_a_window() -> None:
    d = StragglerDetector(factor=FACTOR, window_seconds=0.0)
    assert not any(d.observe(0.2 * 1.4, [0.2, 0.2], now=float(t)).straggler for t in range(20))


def test_a_node_that_recovers_is_cleared_at_once() -> None:
    d = detector()
    for t in range(12):
        d.observe(0.5, [0.2, 0.2], now=float(t))
    assert d.straggler
    verdict = d.observe(0.21, [0.2, 0.2], now=12.0)
    assert not verdict.straggler and verdict.changed and verdict.slow_seconds == 0.0


def test_fewer_than_two_nodes_never_flags() -> None:
    d = detector()
    for t in range(30):
        verdict = d.observe(5.0, [], now=float(t))
        assert not verdict.straggler and verdict.score is None


def test_a_node_without_its_own_value_is_not_scored() -> None:
    assert detector().observe(None, [0.2, 0.2], now=0.0).score is None


def test_mad_zero_leaves_the_z_score_undefined_and_the_ratio_decides() -> None:
    s = score(0.4, [0.2, 0.2, 0.2])
    assert s is not None and s.robust_z is None and s.ratio == pytest.approx(2.0)
    d = StragglerDetector(factor=FACTOR, window_seconds=0.0)
    assert d.observe(0.4, [0.2, 0.2, 0.2], now=0.0).straggler


def test_the_robust_z_score_uses_the_others_median_and_mad() -> None:
    s = score(0.5, [0.1, 0.2, 0.3])
    assert s is not None and s.reference_seconds == pytest.approx(0.2)
    assert s.robust_z == pytest.approx((0.5 - 0.2) / (1.4826 * 0.1))


def test_one_other_slow_node_does_not_make_a_normal_node_a_straggler() -> None:
    d = StragglerDetector(factor=FACTOR, window_seconds=0.0)
    assert not d.observe(0.2, [0.2, 0.6], now=0.0).straggler  # median of (0.2, 0.6) = 0.4


def test_compute_window_counts_each_beat_once_and_forgets_old_samples() -> None:
    w = ComputeWindow(sample_seconds=5.0)
    w.add({0: beat(0, 0.2, 1.0)}, now=0.0)
    for now in (0.5, 1.0, 1.5):  # the same beat read at every poll
        w.add({0: beat(0, 0.2, 1.0)}, now=now)
    w.add({0: beat(0, 0.9, 2.0)}, now=2.0)
    w.add({0: beat(0, 0.9, 3.0)}, now=3.0)
    assert w.value(now=3.0) == pytest.approx(0.9)  # median of 0.2, 0.9, 0.9
    assert w.value(now=7.5) == pytest.approx(0.9)  # the 0.2 sample is older than 5 s
    assert w.value(now=9.0) is None


def test_the_node_value_is_its_slowest_rank() -> None:
    w = ComputeWindow(sample_seconds=5.0)
    w.add({0: beat(0, 0.2, 1.0), 1: beat(1, 0.7, 1.0), 2: beat(2, None, 1.0)}, now=0.0)
    assert w.value(now=0.0) == pytest.approx(0.7)


def test_peer_values_take_other_nodes_of_the_same_round_only() -> None:
    nodes = {
        "me": {"round": 3, STATUS_KEY: 9.0},
        "b": {"round": 3, STATUS_KEY: 0.2},
        "c": {"round": 2, STATUS_KEY: 0.3},  # an older round: another world size
        "d": {"round": 3},  # not training yet
        "e": {"round": 3, STATUS_KEY: True},
    }
    assert peer_values(nodes, node="me", round_id=3) == [0.2]


def test_the_watch_starts_over_on_a_new_round() -> None:
    watch = StragglerWatch(StragglersConfig(factor=FACTOR, window_seconds=0.0))
    assert watch.update({0: beat(0, 0.6, 1.0)}, others=[0.2], round_id=1, now=0.0).straggler
    verdict = watch.update({}, others=[0.2], round_id=2, now=1.0)
    assert not verdict.straggler and watch.compute_seconds is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"factor": 1.0}, r"factor=1\.0: must be > 1"),
        ({"window_seconds": -1}, r"window_seconds=-1(\.0)?: must be >= 0"),
        ({"sample_seconds": 0}, r"sample_seconds=0(\.0)?: must be > 0"),
        ({"drian": True}, r"unknown key 'drian'"),
    ],
)
def test_bad_stragglers_config_names_the_key_and_the_value(
    section: dict[str, object], message: str
) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        build(StragglersConfig, section)
