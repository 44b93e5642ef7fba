"""Retention policy: which step directories to delete after a commit (pure, no I/O).

Rules (deleting is the only destructive action the checkpoint package takes):

- keep the newest ``keep_last`` committed checkpoints;
- never delete the newest known-good checkpoint, however old (divergence rewinds target it);
- with a :class:`RewindHorizon` (the divergence guard can rewind), also never delete a
  checkpoint the guard may still rewind to: every known-good checkpoint newer than
  ``newest - target_lookback_steps``, the newest known-good one at or below that step, and every
  checkpoint not known-good yet that may still be promoted (younger than ``promotion_steps``);
- delete torn directories (no manifest) only when their step is below the newest committed step:
  one above it may be a save still in flight, or a retired step a replay will write again.

Why the horizon rules suffice: the guard rewinds to the newest known-good checkpoint at or below
``onset - min_steps_back`` (else to the newest known-good before the onset), and every future
onset lies at or after ``newest - max_onset_lag_steps``; so a known-good checkpoint older than the
newest one at or below ``newest - (min_steps_back + max_onset_lag_steps)`` can never be chosen
again. A checkpoint is promoted ``good_after_steps`` after its step unless an anomaly came after
it, which shows within the guard's episode window; one still unpromoted past both is never
promoted on this timeline.

Directories whose manifest could not be read are neither committed nor torn here: an error
never causes a deletion.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from elastic.checkpoint.manifest import Manifest

__all__ = ["RetentionPlan", "RewindHorizon", "plan_retention", "rewind_targets"]


@dataclass(frozen=True)
class RewindHorizon:
    """How far back the divergence guard may still reach (see the module docstring).

    Built by the worker API from the ``guard`` and ``rewind`` sections
    (``elastic.guard.config.rewind_lookback_steps`` and ``promotion_horizon_steps``).
    """

    target_lookback_steps: int | None
    """``rewind.min_steps_back + max_onset_lag_steps``; ``None`` when the guard never rewinds
    (guard or rewinds disabled): then only the newest known-good checkpoint is kept on top."""
    promotion_steps: int
    """A checkpoint not yet known-good is kept while ``newest - step < promotion_steps``."""

    def __post_init__(self) -> None:
        lookback = self.target_lookback_steps
        if lookback is not None and lookback < 0:
            raise ValueError(f"target_lookback_steps={lookback!r}: must be >= 0")
        if self.promotion_steps < 1:
            raise ValueError(f"promotion_steps={self.promotion_steps!r}: must be >= 1")


@dataclass(frozen=True)
class RetentionPlan:
    delete_committed: tuple[int, ...]
    """Steps of committed checkpoints to delete, oldest first."""
    delete_torn: tuple[int, ...]
    """Steps of torn directories (no manifest) to delete, oldest first."""


def plan_retention(
    committed: Sequence[Manifest],
    torn_steps: Iterable[int],
    *,
    keep_last: int,
    horizon: RewindHorizon | None = None,
) -> RetentionPlan:
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last!r}: must be >= 1")
    steps = sorted({m.step for m in committed})
    if not steps:
        return RetentionPlan(delete_committed=(), delete_torn=())
    newest = steps[-1]
    good = sorted({m.step for m in committed if m.known_good})
    keep = set(steps[-keep_last:]) | set(good[-1:])
    if horizon is not None:
        keep |= rewind_targets(good, newest_step=newest, horizon=horizon)
        keep |= {s for s in steps if s not in good and newest - s < horizon.promotion_steps}
    torn = sorted(s for s in set(torn_steps) if s < newest)
    return RetentionPlan(
        delete_committed=tuple(s for s in steps if s not in keep),
        delete_torn=tuple(torn),
    )


def rewind_targets(
    good_steps: Sequence[int], *, newest_step: int, horizon: RewindHorizon
) -> set[int]:
    """The known-good steps a rewind after ``newest_step`` may still choose (all of
    ``good_steps`` above the lookback limit, plus the newest one at or below it)."""
    if horizon.target_lookback_steps is None:
        return set()
    limit = newest_step - horizon.target_lookback_steps
    targets = {s for s in good_steps if s > limit}
    below = [s for s in good_steps if s <= limit]
    if below:
        targets.add(max(below))
    return targets
