"""GuardConfig / RewindConfig validation and the retention condition."""

from __future__ import annotations

import itertools

import pytest

from elastic.config import ConfigError, build
from elastic.guard import GuardConfig, RewindConfig, validate_retention
from elastic.guard.config import required_history_steps


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


def test_retention_accepts_a_schedule_that_keeps_a_target() -> None:
    validate_retention(interval_steps=100, keep_last=3, rewind=RewindConfig())


def test_retention_error_names_the_keys() -> None:
    with pytest.raises(ValueError) as info:
        validate_retention(interval_steps=100, keep_last=2, rewind=RewindConfig())
    text = str(info.value)
    for key in (
        "checkpoint.keep_last=2",
        "checkpoint.interval_steps=100",
        "rewind.min_steps_back=100",
        "rewind.good_after_steps=50",
        "guard.skip_window_steps",
        "keep_last to >= 3",
    ):
        assert key in text


def test_retention_checks_its_own_arguments() -> None:
    with pytest.raises(ValueError, match=r"^checkpoint\.interval_steps=0"):
        validate_retention(interval_steps=0, keep_last=3, rewind=RewindConfig())
    with pytest.raises(ValueError, match=r"^checkpoint\.keep_last=0"):
        validate_retention(interval_steps=100, keep_last=0, rewind=RewindConfig())


def test_retention_is_free_when_rewinds_are_off() -> None:
    validate_retention(interval_steps=100, keep_last=1, rewind=RewindConfig(enabled=False))
    validate_retention(
        interval_steps=100,
        keep_last=1,
        rewind=RewindConfig(),
        guard=GuardConfig(enabled=False),
    )


def _always_has_target(*, interval: int, keep: int, back: int, good: int, lag: int) -> bool:
    """Brute force over trigger steps T and onsets t in [T - lag, T].

    Checkpoints at multiples of ``interval`` up to T, the newest ``keep`` kept; a checkpoint is
    known-good when it was promoted before the onset (``t - 1 - c >= good``); eligible when
    ``c <= t - back``.
    """
    start = 4 * (back + good + lag + interval)  # far from step 0: full history exists
    for trigger in range(start, start + 2 * interval + 1):
        newest = trigger // interval * interval
        kept = range(newest - (keep - 1) * interval, newest + 1, interval)
        for onset in range(trigger - lag, trigger + 1):
            if not any(c <= onset - back and onset - 1 - c >= good for c in kept):
                return False
    return True


def test_retention_condition_is_exact() -> None:
    """validate_retention accepts exactly the schedules the brute force finds safe."""
    for interval, keep, back, good, window in itertools.product(
        (1, 7, 20), (1, 2, 3, 5), (0, 10, 25), (0, 5, 30), (1, 8)
    ):
        guard = GuardConfig(
            skip_window_steps=window, nonfinite_window_steps=window, sustained_steps=window
        )
        rewind = RewindConfig(min_steps_back=back, good_after_steps=good)
        try:
            validate_retention(interval_steps=interval, keep_last=keep, rewind=rewind, guard=guard)
            accepted = True
        except ValueError:
            accepted = False
        safe = _always_has_target(
            interval=interval, keep=keep, back=back, good=good, lag=guard.max_onset_lag_steps
        )
        assert accepted == safe, (interval, keep, back, good, window)
        assert required_history_steps(rewind=rewind, guard=guard) >= back
