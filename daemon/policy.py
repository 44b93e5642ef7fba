"""Pure decisions of the supervisor: what a round's observations mean, and the restart budget.

``decide()`` maps what the daemon sees during a round (worker exit codes, heartbeats, output,
group changes, signals) to one :class:`Decision`; the supervisor applies it in one place. No
I/O, no clock reads: times come in as arguments, so unit tests never sleep.

Hang detection has two regimes. Once a worker of the round has written a heartbeat (the worker
API writes its first at ``init()``), no step progress for the hang timeout is a hang. Before
any heartbeat (a loop without the API, or one still importing) the daemon cannot tell slow from
stuck; the only check is ``worker.silence_timeout_seconds`` (off by default): no output line from
any local worker for that long, once one has printed (a node whose workers never print, e.g. no
global rank 0 in a loop where only that rank prints, is not judged).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from elastic.protocol import CLEAN_EXITS, ExitCode


class Reason(StrEnum):
    """Why workers stopped (also the ``reason`` label of the restart counter)."""

    CRASH = "crash"
    HANG = "hang"
    NODE_LOST = "node_lost"
    SCALE = "scale"
    DRAIN = "drain"


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


CONTINUE = Decision(Kind.CONTINUE)


@dataclass(frozen=True)
class Observation:
    """One tick of a round, as the supervisor saw it."""

    exit_codes: Sequence[int | None]  # per local rank; None while running
    last_progress_unix: float  # newest step completion (or start) across local workers
    now_unix: float
    hang_timeout_seconds: float
    heartbeats_seen: bool = True  # a worker of this round wrote a heartbeat
    silent_seconds: float | None = None  # since any worker's newest output; None: none yet
    silence_timeout_seconds: float = 0.0  # 0: no silence check (before the first heartbeat)
    draining: bool = False  # this node is leaving (SIGTERM) and asked its workers to drain
    regroup: bool = False  # the membership changes: the workers were asked to drain
    peer_failed: bool = False  # another node's workers failed: stop now
    node_lost: bool = False  # a member's lease expired
    fenced: bool = False  # this node's own lease expired: the others dropped it


def decide(obs: Observation) -> Decision:
    codes = list(obs.exit_codes)
    failed = [c for c in codes if c is not None and c not in CLEAN_EXITS]
    if ExitCode.CONFIG in failed:
        return Decision(Kind.CONFIG_ERROR, detail="a worker rejected the configuration")
    if ExitCode.DIVERGED in failed:
        return Decision(Kind.DIVERGED, detail="the divergence guard spent its rewind budget")
    if failed:
        return Decision(Kind.RESTART, Reason.CRASH, detail=f"worker exit codes {codes}")
    if codes and all(c in CLEAN_EXITS for c in codes):
        if all(c == ExitCode.OK for c in codes):
            return Decision(Kind.DONE)
        if obs.draining:
            return Decision(Kind.DRAINED, Reason.DRAIN)
        return Decision(Kind.REGROUP, Reason.SCALE, detail="the group drained for a new round")
    if obs.fenced:
        # Before anything that lets running workers go on: the group may train without us.
        return Decision(Kind.RESTART, Reason.NODE_LOST, detail="this node's lease expired")
    if any(c in CLEAN_EXITS for c in codes):
        # The others are finishing the same step; unless they stopped making progress.
        hang = _hang(obs)
        return Decision(Kind.RESTART, Reason.HANG, detail=hang) if hang else CONTINUE
    if not obs.heartbeats_seen and (obs.draining or obs.regroup):
        # A loop without the worker API cannot drain: stop it now; it resumes from its own
        # checkpoints in the next round.
        detail = "workers do not read drain requests: stopped"
        if obs.draining:
            return Decision(Kind.DRAINED, Reason.DRAIN, detail=detail)
        return Decision(Kind.REGROUP, Reason.SCALE, detail=detail)
    # Only now peers: nodes that finished or drained leave too, and that is no failure of ours.
    if obs.node_lost:
        return Decision(Kind.RESTART, Reason.NODE_LOST, detail="a member's lease expired")
    if obs.peer_failed:
        return Decision(Kind.RESTART, Reason.CRASH, detail="workers failed on another node")
    hang = _hang(obs)
    if hang:
        return Decision(Kind.RESTART, Reason.HANG, detail=hang)
    return CONTINUE


def _hang(obs: Observation) -> str:
    """Why the workers look hung ("" when they do not)."""
    if obs.heartbeats_seen:
        stalled_seconds = obs.now_unix - obs.last_progress_unix
        if stalled_seconds > obs.hang_timeout_seconds:
            return f"no step progress for {stalled_seconds:.1f} s"
        return ""
    silent = obs.silent_seconds
    if silent is not None and 0 < obs.silence_timeout_seconds < silent:
        return f"no heartbeat yet and no output for {silent:.1f} s"
    return ""


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
