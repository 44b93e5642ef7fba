"""Configuration of the divergence guard: YAML sections ``guard`` and ``rewind``.

``GuardConfig`` says what counts as an anomaly and when anomalies escalate to a rewind;
``RewindConfig`` says where a rewind goes and how often one is allowed.
``rewind_lookback_steps`` and ``promotion_horizon_steps`` tell checkpoint retention which
checkpoints a rewind may still need, so any ``keep_last`` works (docs/checkpoints.md).
Defaults follow published practice: OLMo-core's 6-sigma spike rule over a 128-step window that
is silent for the first 64 steps; PaLM's "restart ~100 steps before the spike".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from elastic.config import check

DataAction = Literal["reshuffle", "skip"]
DATA_ACTIONS: tuple[DataAction, ...] = ("reshuffle", "skip")


@dataclass(frozen=True)
class GuardConfig:
    """YAML section ``guard``: detection thresholds and escalation to a rewind.

    Detection (over a rolling window of *accepted* steps; skipped steps never enter it):

    - ``window_steps``: accepted steps in the robust-statistics window (median / MAD).
    - ``warmup_steps``: accepted steps the window needs before spike and elevation checks run;
      until then only non-finite values are acted on.
    - ``z_threshold``: a step is a spike when ``(value - median) / sigma > z_threshold`` for the
      loss or the grad norm, ``sigma = 1.4826 * MAD`` (upward spikes only).
    - ``scale_floor_fraction``: ``sigma`` is at least this fraction of ``|median|``, so a nearly
      noiseless curve does not call a 1% wiggle a 6-sigma spike (a spike needs >= 6% by default).
    - ``ema_steps``: span of the loss's exponential moving average (alpha = 2 / (span + 1)).
    - ``sustained_ratio`` / ``sustained_steps``: the loss is *elevated* while its moving average
      exceeds ``sustained_ratio`` x the window median; elevated for ``sustained_steps`` steps in a
      row -> rewind. ``sustained_steps: 0`` turns this check off.

    Escalation:

    - ``skips_to_rewind`` skipped steps (any kind) within ``skip_window_steps`` steps -> rewind.
    - ``nonfinite_to_rewind`` non-finite steps within ``nonfinite_window_steps`` steps -> rewind.
    """

    enabled: bool = True
    window_steps: int = 128
    warmup_steps: int = 64
    z_threshold: float = 6.0
    scale_floor_fraction: float = 0.01
    ema_steps: int = 10
    sustained_ratio: float = 1.05
    sustained_steps: int = 20
    skips_to_rewind: int = 3
    skip_window_steps: int = 50
    nonfinite_to_rewind: int = 2
    nonfinite_window_steps: int = 50

    def __post_init__(self) -> None:
        check(self.window_steps >= 1, "window_steps", self.window_steps, "must be >= 1")
        check(
            1 <= self.warmup_steps <= self.window_steps,
            "warmup_steps",
            self.warmup_steps,
            f"must be >= 1 and <= window_steps ({self.window_steps})",
        )
        _check_positive_float("z_threshold", self.z_threshold)
        check(
            math.isfinite(self.scale_floor_fraction) and self.scale_floor_fraction >= 0,
            "scale_floor_fraction",
            self.scale_floor_fraction,
            "must be a finite number >= 0",
        )
        check(self.ema_steps >= 1, "ema_steps", self.ema_steps, "must be >= 1")
        check(
            math.isfinite(self.sustained_ratio) and self.sustained_ratio > 1.0,
            "sustained_ratio",
            self.sustained_ratio,
            "must be a finite number > 1",
        )
        check(self.sustained_steps >= 0, "sustained_steps", self.sustained_steps, "must be >= 0")
        for key in (
            "skips_to_rewind",
            "skip_window_steps",
            "nonfinite_to_rewind",
            "nonfinite_window_steps",
        ):
            value = getattr(self, key)
            check(value >= 1, key, value, "must be >= 1")

    @property
    def episode_window_steps(self) -> int:
        """An anomaly episode closes after this many steps without an anomaly."""
        return max(self.skip_window_steps, self.nonfinite_window_steps)

    @property
    def max_onset_lag_steps(self) -> int:
        """Upper bound of ``trigger_step - onset_step`` for any rewind this config can issue."""
        return max(self.episode_window_steps, self.sustained_steps) - 1


@dataclass(frozen=True)
class RewindConfig:
    """YAML section ``rewind``: where a rewind goes, what happens to its data, the budget.

    - ``min_steps_back``: the target is the newest known-good checkpoint at least this many
      steps before the onset (PaLM restarted ~100 steps before a spike).
    - ``data``: the data of the steps from the target to the trigger is ``reshuffle``-d (drawn
      with a new salt) or ``skip``-ped. A window that diverges again is always skipped.
    - ``lr_multiplier`` / ``lr_multiplier_steps``: scale the learning rate for that many steps
      after the rewind (OPT-175B lowered the LR after divergences). 1.0 / 0 = unchanged.
    - ``max_rewinds`` within ``budget_window_steps`` steps; one more -> give up (``diverged``).
    - ``good_after_steps``: a checkpoint becomes known-good after this many healthy steps beyond
      it with no anomaly episode open.
    """

    enabled: bool = True
    min_steps_back: int = 100
    data: DataAction = "reshuffle"
    lr_multiplier: float = 1.0
    lr_multiplier_steps: int = 0
    max_rewinds: int = 3
    budget_window_steps: int = 2000
    good_after_steps: int = 50

    def __post_init__(self) -> None:
        check(self.min_steps_back >= 0, "min_steps_back", self.min_steps_back, "must be >= 0")
        check(
            self.data in DATA_ACTIONS,
            "data",
            self.data,
            f"must be one of {', '.join(DATA_ACTIONS)}",
        )
        _check_positive_float("lr_multiplier", self.lr_multiplier)
        check(
            self.lr_multiplier_steps >= 0,
            "lr_multiplier_steps",
            self.lr_multiplier_steps,
            "must be >= 0",
        )
        check(self.max_rewinds >= 0, "max_rewinds", self.max_rewinds, "must be >= 0")
        check(
            self.budget_window_steps >= 1,
            "budget_window_steps",
            self.budget_window_steps,
            "must be >= 1",
        )
        check(self.good_after_steps >= 0, "good_after_steps", self.good_after_steps, "must be >= 0")


def _check_positive_float(key: str, value: float) -> None:
    check(math.isfinite(value) and value > 0, key, value, "must be a finite number > 0")


def rewind_lookback_steps(*, rewind: RewindConfig, guard: GuardConfig) -> int | None:
    """How far behind the newest checkpoint the far limit of a future rewind may lie.

    A rewind's target is the newest known-good checkpoint at or below ``onset -
    min_steps_back``, and an onset lies at most ``guard.max_onset_lag_steps`` before its
    trigger, which comes after the newest checkpoint. ``None`` when the guard never rewinds.
    Checkpoint retention keeps every target this allows (docs/checkpoints.md).
    """
    if not (guard.enabled and rewind.enabled):
        return None
    return rewind.min_steps_back + guard.max_onset_lag_steps


def promotion_horizon_steps(*, rewind: RewindConfig, guard: GuardConfig) -> int:
    """Steps after which a checkpoint not yet known-good never will be on this timeline.

    ``promotions()`` marks it ``good_after_steps`` after its step unless an anomaly came after
    it; an anomaly that keeps an episode open lies within ``episode_window_steps`` of the
    current step. The +1: the trainer asks for promotions after it saves a step's checkpoint.
    """
    return max(rewind.good_after_steps, guard.episode_window_steps) + 1
