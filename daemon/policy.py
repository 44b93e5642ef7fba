"""Pure decisions of the supervisor: what a round's observations mean, and the restart budget.

``decide()`` maps what the daemon sees during a round (worker exit codes, heartbeats, group
changes, signals) to one :class:`Decision`; the supervisor applies it in one place. No I/O, no
clock reads: times come in as arguments, so unit tests never sleep.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_DRAINED = 4  # a worker committed a checkpoint at a step boundary and left (group change)
CLEAN = frozenset({EXIT_OK, EXIT_DRAINED})


class Reason(StrEnum):
    """Why workers stopped (also the ``reason`` label of the restart counter)."""

    CRASH = "crash"
    HANG = "hang"
    NODE_LOST = "node_lost"
    SCALE = "scale"
    DRAIN = "drain"
    REWIND = "rewind"


class Kind(StrEnum):
    CONTINUE = "continue"  # nothing to do this tick
    RESTART = "restart"  # stop workers now, form a new round
    REGROUP = "regroup"  # workers drained cleanly for a membership change: new round
    DONE = "done"  # training finished
    DRAINED = "drained"  # our own drain finished
    DIVERGED = "diverged"
    CONFIG_ERROR = "config_error"


@dataclass(frozen=True)
class Decision:
    kind: Kind
    reason: Reason | None = None
    detail: str = ""


@dataclass(frozen=True)
class Observation:
    """One tick of a round, as the supervisor saw it."""

    exit_codes: Sequence[int | None]  # per local rank; None while running
    last_progress_unix: float  # newest step completion (or start) across local workers
    now_unix: float
    hang_timeout_seconds: float
    draining: bool = False  # this node is leaving (SIGTERM) and asked its workers to drain
    peer_failed: bool = False  # another node's workers failed: stop now
    node_lost: bool = False  # a member's lease expired


def decide(obs: Observation) -> Decision:
    codes = list(obs.exit_codes)
    failed = [c for c in codes if c is not None and c not in CLEAN]
    if EXIT_CONFIG in failed:
        return Decision(Kind.CONFIG_ERROR, detail="a worker rejected the configuration")
    if EXIT_DIVERGED in failed:
        return Decision(Kind.DIVERGED, detail="the divergence guard spent its rewind budget")
    if failed:
        return Decision(Kind.RESTART, Reason.CRASH, detail=f"worker exit codes {codes}")
    if codes and all(c in CLEAN for c in codes):
        if all(c == EXIT_OK for c in codes):
            return Decision(Kind.DONE)
        if obs.draining:
            return Decision(Kind.DRAINED, Reason.DRAIN)
        return Decision(Kind.REGROUP, Reason.SCALE, detail="the group drained for a new round")
    if any(c in CLEAN for c in codes):
        return Decision(Kind.CONTINUE)  # the others are finishing the same step
    # Only now peers: nodes that finished or drained leave too, and that is no failure of ours.
    if obs.node_lost:
        return Decision(Kind.RESTART, Reason.NODE_LOST, detail="a member's lease expired")
    if obs.peer_failed:
        return Decision(Kind.RESTART, Reason.CRASH, detail="workers failed on another node")
    silent_seconds = obs.now_unix - obs.last_progress_unix
    if silent_seconds > obs.hang_timeout_seconds:
        return Decision(
            Kind.RESTART, Reason.HANG, detail=f"no step progress for {silent_seconds:.1f} s"
        )
    return Decision(Kind.CONTINUE)


class RestartBudget:
    """At most ``max_restarts`` restarts in any ``window_seconds``; past that, a crash loop."""

    def __init__(self, *, max_restarts: int, window_seconds: float) -> None:
        self._max = max_restarts
        self._window = window_seconds
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Record a restart at ``now`` if the budget allows it."""
        while self._times and now - self._times[0] > self._window:
            self._times.popleft()
        if len(self._times) >= self._max:
            return False
        self._times.append(now)
        return True

    @property
    def used(self) -> int:
        return len(self._times)
