"""Goodput accounting: where one node's wall time went (pure; the clock comes in as arguments).

Every daemon keeps one :class:`Ledger`. It splits the wall time since the daemon's process
started into exclusive buckets that always add up to it (docs/goodput.md):

- **productive**: time of steps that survive in the run's final lineage;
- **badput**, by :class:`Badput` kind: ``startup``, ``rendezvous``, ``checkpoint_load``,
  ``recompute``, ``checkpoint_blocking``, ``hang_timeout``, ``paused``, ``degraded``, ``other``.

Attribution. The supervisor calls :meth:`Ledger.observe` at every lifecycle transition and every
monitor tick with what the node does *now* (:class:`Activity`, from the lifecycle state and the
workers' heartbeat phases: :func:`activity_of_state`, :func:`activity_of_phases`); the interval
since the previous call goes to the previous activity. Training time is *pending* until a
heartbeat shows new steps: then it is spread evenly over them and each enters the lineage.

Lineage. A step number seen again (the first steps after a crash resumed from an older
checkpoint, or after a rewind) means that every lineage step from it on was lost: their time
moves from productive to ``recompute`` (so ``recompute`` is the computation thrown away, equal
to the time spent redoing it up to step-time noise). The ``degraded`` share of a step, the
fraction ``(nodes.max - nodes) / nodes.max`` of its time, is badput when it is computed and
stays there, so every badput total only grows (they are Prometheus counters); productive is a
gauge that may fall.

Caveats, all bounded by the monitor's poll interval: heartbeats overwrite each other, so the
first redone step is detected at the first tick that sees it and steps completed before it in
the same tick keep their first computation's time; the step that follows a checkpoint load is
counted as load (the worker's next beat comes after it); a rewind whose redone steps pass the
old head between two ticks is not seen.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from daemon.lifecycle import TERMINAL, State
from elastic.protocol import Phase


class Activity(StrEnum):
    """What the node is doing at one moment."""

    STARTUP = "startup"  # the daemon starting, or a round's workers forming their group
    RENDEZVOUS = "rendezvous"  # joining or waiting for a round, tearing one down
    CHECKPOINT_LOAD = "checkpoint_load"
    TRAINING = "training"
    CHECKPOINT_BLOCKING = "checkpoint_blocking"  # a save on the training path
    PAUSED = "paused"  # `elasticctl pause`, or diverged until an operator's rewind
    OTHER = "other"  # evaluation, draining without workers


class Badput(StrEnum):
    """The kinds of lost time (the ``kind`` label of ``elasticd_badput_seconds_total``)."""

    STARTUP = "startup"
    RENDEZVOUS = "rendezvous"
    CHECKPOINT_LOAD = "checkpoint_load"
    RECOMPUTE = "recompute"  # computation lost to a crash, hang or rewind
    CHECKPOINT_BLOCKING = "checkpoint_blocking"
    HANG_TIMEOUT = "hang_timeout"  # from the last progress to the hang decision
    PAUSED = "paused"
    DEGRADED = "degraded"  # the missing nodes' share of step time below nodes.max
    OTHER = "other"


_BADPUT_OF: dict[Activity, Badput] = {
    Activity.STARTUP: Badput.STARTUP,
    Activity.RENDEZVOUS: Badput.RENDEZVOUS,
    Activity.CHECKPOINT_LOAD: Badput.CHECKPOINT_LOAD,
    Activity.CHECKPOINT_BLOCKING: Badput.CHECKPOINT_BLOCKING,
    Activity.PAUSED: Badput.PAUSED,
    Activity.OTHER: Badput.OTHER,
}

PRODUCTIVE = "productive"  # the rates' name for training time
_TRAINING_LIKE = frozenset({Activity.TRAINING, Activity.CHECKPOINT_BLOCKING, Activity.OTHER})

# By precedence: a node is as far from training as its furthest rank.
_PHASE_ACTIVITY = (
    (Phase.START, Activity.STARTUP),
    (Phase.LOAD, Activity.CHECKPOINT_LOAD),
    (Phase.SAVE, Activity.CHECKPOINT_BLOCKING),
    (Phase.EVAL, Activity.OTHER),
    (Phase.PAUSED, Activity.PAUSED),
)

# RUNNING and DRAINING are refined from heartbeats while a round's workers run.
_STATE_ACTIVITY: dict[State, Activity] = {
    State.STARTING: Activity.STARTUP,
    State.JOINING: Activity.RENDEZVOUS,
    State.WAITING: Activity.RENDEZVOUS,
    State.RUNNING: Activity.STARTUP,
    State.DRAINING: Activity.OTHER,
    State.DIVERGED: Activity.PAUSED,  # training held until an operator rewinds
}


def activity_of_state(state: State) -> Activity:
    """The activity a lifecycle state starts (terminal states end the ledger: not here)."""
    assert state not in TERMINAL, state
    return _STATE_ACTIVITY[state]


def activity_of_phases(phases: Collection[Phase]) -> Activity:
    """What a round's workers are doing, from their heartbeat phases (none yet: starting)."""
    if not phases:
        return Activity.STARTUP
    for phase, activity in _PHASE_ACTIVITY:
        if phase in phases:
            return activity
    return Activity.TRAINING


@dataclass(frozen=True)
class Summary:
    """The ledger at one moment: ``productive + sum(badput) == wall`` (up to rounding)."""

    wall_seconds: float
    productive_seconds: float
    badput_seconds: Mapping[Badput, float]
    # The share of each wall second that goes to each bucket ("productive" or a badput kind)
    # from now on, for readers that extrapolate between the node's status writes; empty once
    # the ledger stopped. Brief interruptions of training (a blocking save, an evaluation)
    # count as training here: they would otherwise cost a status write each.
    rates: Mapping[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Goodput: the productive share of wall time (0 before any time passed)."""
        return self.productive_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "wall_seconds": round(self.wall_seconds, 3),
            "productive_seconds": round(self.productive_seconds, 3),
            "ratio": round(self.ratio, 4),
            "badput_seconds": {k.value: round(v, 3) for k, v in self.badput_seconds.items()},
            "rates": {k: round(v, 4) for k, v in self.rates.items()},
        }


class Ledger:
    """One node's wall time split into productive and badput buckets. Thread-safe: the monitor
    writes, the status endpoint reads."""

    def __init__(self, *, started_seconds: float, max_nodes: int) -> None:
        assert max_nodes >= 1, max_nodes
        self._lock = threading.Lock()
        self._started = started_seconds
        self._at = started_seconds  # everything before this instant is attributed
        self._stopped: float | None = None
        self._activity = Activity.STARTUP
        self._max_nodes = max_nodes
        self._nodes = max_nodes
        self._badput = dict.fromkeys(Badput, 0.0)
        self._lineage: dict[int, float] = {}  # step -> productive seconds of its computation
        self._head = 0  # newest step entered in the lineage
        self._last_seen: int | None = None  # newest step seen this round (None: none yet)
        self._pending = 0.0  # training seconds not yet attributed to a step

    # ----------------------------------------------------------------- inputs
    def observe(
        self,
        now: float,
        activity: Activity,
        *,
        step: int | None = None,
        nodes: int | None = None,
    ) -> None:
        """From ``now`` on the node does ``activity``; ``step``: the newest completed step its
        workers report (0 or None: none known), ``nodes``: the round's node count."""
        with self._lock:
            if self._stopped is not None:
                return
            self._close(now)
            if nodes is not None:
                self._nodes = max(1, min(nodes, self._max_nodes))
            if step:
                self._see_step(step)
            self._activity = activity

    def start_round(self, now: float, *, nodes: int) -> None:
        """A round's workers are starting: the steps they report next may redo old ones."""
        self.observe(now, Activity.STARTUP, nodes=nodes)
        with self._lock:
            self._last_seen = None

    def end_round(self, now: float, *, lost_to: Badput | None) -> None:
        """The round's workers stop. ``lost_to``: the bucket of the training time since the
        last step seen (a hang's wait, a crash's partial step); None keeps it pending, for the
        steps a clean exit completed after the last tick."""
        with self._lock:
            if self._stopped is not None:
                return
            self._close(now)
            if lost_to is not None:
                self._badput[lost_to] += self._pending
                self._pending = 0.0
            self._activity = Activity.RENDEZVOUS

    def stop(self, now: float) -> None:
        """The daemon reached a terminal state: the wall clock stops (pending stays
        productive: the steps of a finished run were computed and kept)."""
        with self._lock:
            if self._stopped is None:
                self._close(now)
                self._stopped = self._at

    def summary(self, now: float) -> Summary:
        with self._lock:
            if self._stopped is None:
                self._close(now)
            return Summary(
                wall_seconds=self._at - self._started,
                productive_seconds=sum(self._lineage.values()) + self._pending,
                badput_seconds=dict(self._badput),
                rates={} if self._stopped is not None else self._rates(),
            )

    def _rates(self) -> dict[str, float]:
        if self._activity not in _TRAINING_LIKE:
            return {_BADPUT_OF[self._activity].value: 1.0}
        degraded = (self._max_nodes - self._nodes) / self._max_nodes
        rates = {PRODUCTIVE: 1.0 - degraded, Badput.DEGRADED.value: degraded}
        return {k: v for k, v in rates.items() if v > 0}

    # ----------------------------------------------------------------- attribution
    def _close(self, now: float) -> None:
        """Attribute ``[self._at, now]`` to the current activity."""
        elapsed = max(0.0, now - self._at)
        self._at += elapsed
        if self._activity is Activity.TRAINING:
            self._pending += elapsed
        else:
            self._badput[_BADPUT_OF[self._activity]] += elapsed

    def _see_step(self, step: int) -> None:
        if step == self._last_seen:
            return
        redone = self._last_seen is None or step < self._last_seen
        if redone and step <= self._head:
            self._lose_from(step)
        if step > self._head:
            self._complete(range(self._head + 1, step + 1))
        self._last_seen = step

    def _lose_from(self, step: int) -> None:
        """Lineage steps ``step..head`` were lost: their time was recomputation."""
        for lost in range(step, self._head + 1):
            self._badput[Badput.RECOMPUTE] += self._lineage.pop(lost, 0.0)
        self._head = step - 1

    def _complete(self, steps: range) -> None:
        each_seconds = self._pending / len(steps)
        degraded = (self._max_nodes - self._nodes) / self._max_nodes
        for step in steps:
            self._lineage[step] = each_seconds * (1.0 - degraded)
        self._badput[Badput.DEGRADED] += self._pending * degraded
        self._pending = 0.0
        self._head = steps[-1]


def process_age_seconds() -> float:
    """How long this process has run (Linux ``/proc``; 0 elsewhere): the ledger's wall time
    starts at the process's start, so interpreter start-up and imports count as ``startup``."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            # Field 22 (starttime, in clock ticks since boot); the name (field 2) may hold spaces.
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime_seconds = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime_seconds - start_ticks / os.sysconf("SC_CLK_TCK"))
