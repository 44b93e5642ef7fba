"""GuardConfig / RewindConfig validation and the horizons checkpoint retention reads."""

from __future__ import annotations

import pytest

from elastic.config import ConfigError, build
from elastic.guard import (
    GuardConfig,
    RewindConfig,
    promotion_horizon_steps,
    rewind_lookback_steps,
)


def test_defaults_follow_the_documented_values() -> None:
    guard, rewind = GuardConfig(), RewindConfig()
    assert (guard.window_steps, guard.warmup_steps, guard.z_threshold) == (128, 64, 6.0)
    assert (guard.skips_to_rewind, guard.skip_window_steps) == (3, 50)
    assert (guard.nonfinite_to_rewind, guard.nonfinite_window_steps) == (2, 50)
    assert (rewind.min_steps_back, rewind.data, rewind.lr_multiplier) == (100, "reshuffle", 1.0)
    assert (rewind.max_rewinds, rewind.budget_window_steps, rewind.good_after_steps) == (
        3,
        2000,
        50,
    )


def test_bad_value_error_names_the_key_and_value() -> None:
    with pytest.raises(ValueError, match=r"^min_steps_back=-1: must be >= 0$"):
        RewindConfig(min_steps_back=-1)


def test_builder_prefixes_the_section() -> None:
    with pytest.raises(ConfigError, match=r"^rewind\.min_steps_back=-1: must be >= 0$"):
        build(RewindConfig, {"min_steps_back": -1}, path="rewind.")
    with pytest.raises(ConfigError, match=r"guard\.warmup_steps=200: must be >= 1 and <= "):
        build(GuardConfig, {"warmup_steps": 200}, path="guard.")


def test_unknown_keys_and_bad_data_action_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'guard\.zscore'"):
        build(GuardConfig, {"zscore": 3}, path="guard.")
    with pytest.raises(ConfigError, match=r"rewind\.data='drop': must be one of reshuffle, skip"):
        build(RewindConfig, {"data": "drop"}, path="rewind.")
    with pytest.raises(ValueError, match="data='drop'"):
        RewindConfig(data="drop")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("z_threshold", 0.0),
        ("z_threshold", float("nan")),
        ("sustained_ratio", 1.0),
        ("skips_to_rewind", 0),
        ("ema_steps", 0),
        ("scale_floor_fraction", -0.1),
    ],
)
def test_guard_rejects_out_of_range(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{key}="):
        GuardConfig(**{key: value})  # type: ignore[arg-type]


def test_yaml_values_build_the_sections() -> None:
    guard = build(GuardConfig, {"z_threshold": 5, "sustained_steps": 0}, path="guard.")
    rewind = build(RewindConfig, {"data": "skip", "lr_multiplier": 0.5}, path="rewind.")
    assert guard.z_threshold == 5.0 and guard.sustained_steps == 0
    assert rewind.data == "skip" and rewind.lr_multiplier == 0.5


def test_rewind_lookback_is_min_steps_back_plus_the_onset_lag() -> None:
    guard = GuardConfig(skip_window_steps=30, nonfinite_window_steps=40, sustained_steps=60)
    rewind = RewindConfig(min_steps_back=100)
    assert guard.max_onset_lag_steps == 59
    assert rewind_lookback_steps(rewind=rewind, guard=guard) == 159


def test_rewind_lookback_is_none_when_nothing_can_rewind() -> None:
    assert rewind_lookback_steps(rewind=RewindConfig(enabled=False), guard=GuardConfig()) is None
    assert rewind_lookback_steps(rewind=RewindConfig(), guard=GuardConfig(enabled=False)) is None


def test_promotion_horizon_covers_good_after_steps_and_the_episode_window() -> None:
    guard = GuardConfig(skip_window_steps=50, nonfinite_window_steps=20)
    assert promotion_horizon_steps(rewind=RewindConfig(good_after_steps=10), guard=guard) == 51
    assert promotion_horizon_steps(rewind=RewindConfig(good_after_steps=80), guard=guard) == 81
