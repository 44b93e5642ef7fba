"""Retention policy: which step directories to delete after a commit (pure, no I/O).

Rules (deleting is the only destructive action the checkpoint package takes):

- keep the newest ``keep_last`` committed checkpoints;
- never delete the newest known-good checkpoint, however old (divergence rewinds target it);
- delete torn directories (no manifest) only when their step is below the newest committed step:
  one above it may be a save still in flight, or a retired step a replay will write again.

Directories whose manifest could not be read are neither committed nor torn here: an error
never causes a deletion.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from elastic.checkpoint.manifest import Manifest

__all__ = ["RetentionPlan", "plan_retention"]


@dataclass(frozen=True)
class RetentionPlan:
    delete_committed: tuple[int, ...]
    """Steps of committed checkpoints to delete, oldest first."""
    delete_torn: tuple[int, ...]
    """Steps of torn directories (no manifest) to delete, oldest first."""


def plan_retention(
    committed: Sequence[Manifest], torn_steps: Iterable[int], *, keep_last: int
) -> RetentionPlan:
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last!r}: must be >= 1")
    steps = sorted({m.step for m in committed})
    keep = set(steps[-keep_last:])
    good = [m.step for m in committed if m.known_good]
    if good:
        keep.add(max(good))
    newest = steps[-1] if steps else None
    torn = sorted(s for s in set(torn_steps) if newest is not None and s < newest)
    return RetentionPlan(
        delete_committed=tuple(s for s in steps if s not in keep),
        delete_torn=tuple(torn),
    )
