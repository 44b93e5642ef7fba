"""Rolling robust statistics of accepted steps: median / MAD z-scores and the loss's average.

This module owns numbers only; what a number means (skip, rewind) is decided in ``policy``.
Everything is recomputed from the stored samples with plain Python floats in a fixed order
(sorted lists, a FIFO deque), so two processes fed the same inputs get bit-identical results and
a state restored from JSON (floats round-trip exactly through ``repr``) continues identically.

Why median / MAD rather than mean / std (OLMo-core's rule): one spike that slipped into the
window inflates a standard deviation for the next ``window`` steps and hides the next spike; the
median and MAD ignore up to half the window being odd.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# sigma = 1.4826 * MAD for normally distributed noise.
MAD_TO_SIGMA = 1.4826
# Last-resort sigma when the window is constant and its median is 0 (keeps z finite).
ABSOLUTE_SCALE_FLOOR = 1e-12


@dataclass(frozen=True)
class Sample:
    """One accepted step: its global step, loss and grad norm (before clipping)."""

    step: int
    loss: float
    grad_norm: float


@dataclass(frozen=True)
class RobustStats:
    """Median and robust sigma of one quantity over the window."""

    median: float
    sigma: float

    def z(self, value: float) -> float:
        return (value - self.median) / self.sigma


@dataclass(frozen=True)
class Reading:
    """The window's view of one step; ``None`` stats while the window is still warming up."""

    loss: RobustStats | None
    grad_norm: RobustStats | None
    loss_z: float | None
    grad_z: float | None

    @property
    def armed(self) -> bool:
        return self.loss is not None


def median_of_sorted(values: Sequence[float]) -> float:
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2.0


def robust_stats(values: Iterable[float], *, floor_fraction: float) -> RobustStats:
    """Median and ``max(1.4826 * MAD, floor_fraction * |median|)`` of a non-empty window."""
    ordered = sorted(values)
    med = median_of_sorted(ordered)
    mad = median_of_sorted(sorted(abs(v - med) for v in ordered))
    sigma = max(MAD_TO_SIGMA * mad, floor_fraction * abs(med), ABSOLUTE_SCALE_FLOOR)
    return RobustStats(median=med, sigma=sigma)


class RollingWindow:
    """The last ``window_steps`` accepted samples, oldest first."""

    def __init__(
        self, *, window_steps: int, floor_fraction: float, samples: Iterable[Sample] = ()
    ) -> None:
        self._floor_fraction = floor_fraction
        self._samples: deque[Sample] = deque(samples, maxlen=window_steps)

    def __len__(self) -> int:
        return len(self._samples)

    def samples(self) -> tuple[Sample, ...]:
        return tuple(self._samples)

    def read(self, *, loss: float, grad_norm: float, warmup_steps: int) -> Reading:
        """Z-scores of this step's values against the window (not including them)."""
        if len(self._samples) < warmup_steps:
            return Reading(loss=None, grad_norm=None, loss_z=None, grad_z=None)
        loss_stats = robust_stats(
            (s.loss for s in self._samples), floor_fraction=self._floor_fraction
        )
        grad_stats = robust_stats(
            (s.grad_norm for s in self._samples), floor_fraction=self._floor_fraction
        )
        return Reading(
            loss=loss_stats,
            grad_norm=grad_stats,
            loss_z=loss_stats.z(loss),
            grad_z=grad_stats.z(grad_norm),
        )

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)

    def drop_from(self, step: int) -> None:
        """Forget samples of ``step`` and later (they belong to an abandoned stretch)."""
        kept = [s for s in self._samples if s.step < step]
        self._samples.clear()
        self._samples.extend(kept)

    def clear(self) -> None:
        self._samples.clear()

    def recent_losses(self, count: int) -> list[float]:
        return [s.loss for s in list(self._samples)[-count:]] if count > 0 else []


class LossAverage:
    """Exponential moving average of accepted losses and since when it has been elevated."""

    def __init__(
        self, *, ema_steps: int, value: float | None = None, elevated_since: int | None = None
    ) -> None:
        self._alpha = 2.0 / (ema_steps + 1)
        self._ema_steps = ema_steps
        self.value = value
        self.elevated_since = elevated_since

    def update(self, loss: float) -> float:
        self.value = loss if self.value is None else self.value + self._alpha * (loss - self.value)
        return self.value

    def judge(self, step: int, *, baseline: float | None, ratio: float) -> bool:
        """Mark ``step`` elevated when the average exceeds ``ratio`` x a positive ``baseline``."""
        elevated = (
            baseline is not None
            and baseline > 0
            and self.value is not None
            and self.value > ratio * baseline
        )
        if not elevated:
            self.elevated_since = None
        elif self.elevated_since is None:
            self.elevated_since = step
        return elevated

    def reseed(self, losses: Sequence[float]) -> None:
        """Restart from the mean of the last ``ema_steps`` kept losses (or empty), not elevated."""
        recent = list(losses)[-self._ema_steps :]
        self.value = sum(recent) / len(recent) if recent else None
        self.elevated_since = None
