"""The daemon's lifecycle states and the transitions between them (one table, pure).

starting -> joining          etcd connected, node registered
joining  -> running          a round formed with this node in it
joining  -> waiting          fewer than nodes.min alive: wait, do not exit
waiting  -> joining          enough nodes again
running  -> joining          workers stopped (crash, hang, node lost, scale, rewind)
running  -> draining         SIGTERM: commit a checkpoint, leave
running  -> failed           crash loop past the restart budget
running  -> diverged         the divergence guard spent its rewind budget
diverged -> joining          an operator's `elasticctl rewind --to-step N` (restart from N)
running  -> stopped          training finished
draining -> stopped          checkpoint committed, lease revoked
any      -> stopped          shutdown after a fatal error (logged)
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STARTING = "starting"
    JOINING = "joining"
    RUNNING = "running"
    DRAINING = "draining"
    WAITING = "waiting"
    FAILED = "failed"
    DIVERGED = "diverged"
    STOPPED = "stopped"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.JOINING, State.STOPPED, State.FAILED}),
    State.JOINING: frozenset(
        {State.RUNNING, State.WAITING, State.DRAINING, State.STOPPED, State.FAILED}
    ),
    State.WAITING: frozenset({State.JOINING, State.DRAINING, State.STOPPED}),
    State.RUNNING: frozenset(
        {State.JOINING, State.DRAINING, State.FAILED, State.DIVERGED, State.STOPPED}
    ),
    State.DRAINING: frozenset({State.STOPPED}),
    State.FAILED: frozenset({State.STOPPED}),
    State.DIVERGED: frozenset({State.JOINING, State.STOPPED}),  # JOINING: operator rewind
    State.STOPPED: frozenset(),
}

# No training from here on. DIVERGED is not: an operator's rewind brings it back (joining).
TERMINAL = frozenset({State.FAILED, State.STOPPED})


class TransitionError(RuntimeError):
    """A transition that the table does not allow (a bug, not a user error)."""


def next_state(current: State, target: State) -> State:
    """Return ``target`` if the table allows ``current -> target``; same state is a no-op."""
    if target is current:
        return current
    if target not in TRANSITIONS[current]:
        raise TransitionError(f"{current.value} -> {target.value} is not a lifecycle transition")
    return target
