"""``--wait`` on ``scale``, ``pause``, ``resume`` and ``rewind``: when is a request applied?

Decided from what the daemons already publish in etcd, never from a sleep:

- ``pause``: the newest of the event log's ``paused``/``resumed`` events is ``paused``. Global
  rank 0 writes it once every rank agreed, in the step's collective vote, to hold at this
  boundary: every node of the round holds.
- ``resume``: the newest of them is not ``paused`` (``resumed``, or none: nothing holds).
- ``rewind``: a ``rewind`` event to the requested step, newer than the request (written after
  every rank loaded the checkpoint; also when a diverged run restarts from it). A
  ``rewind_refused`` for that step fails the wait at once with its reason.
- ``scale``: the group's latest round record is closed and formed under the requested bounds:
  every participant joined it knowing them.

Each check is a pure function of what was read, returning :class:`Progress`; :func:`wait` polls
one until it is done, fails, or the deadline (``time.monotonic``) passes. Clock and sleep are
injectable, so the unit tests never sleep.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from elastic.rendezvous.records import RoundRecord

PAUSED, RESUMED = "paused", "resumed"
REWIND, REWIND_REFUSED = "rewind", "rewind_refused"
POLL_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a request stands: ``done``, ``failed`` (with why), or still waiting (``detail``)."""

    done: bool
    detail: str
    failed: bool = False


def pause_applied(events: Sequence[Mapping[str, Any]]) -> Progress:
    newest = _newest(events, {PAUSED, RESUMED})
    if newest is not None and newest.get("event") == PAUSED:
        return Progress(True, f"paused at step {newest.get('step')}")
    return Progress(False, "no paused event yet: the group holds at its next step boundary")


def resume_applied(events: Sequence[Mapping[str, Any]]) -> Progress:
    newest = _newest(events, {PAUSED, RESUMED})
    if newest is None or newest.get("event") != PAUSED:
        step = f" at step {newest.get('step')}" if newest is not None else ""
        return Progress(True, f"training{step}" if step else "not paused")
    return Progress(False, f"still paused at step {newest.get('step')}")


def rewind_applied(
    events: Sequence[Mapping[str, Any]], *, after_seq: int, to_step: int
) -> Progress:
    for event in events:
        if _seq(event) <= after_seq or event.get("to_step") != to_step:
            continue
        if event.get("event") == REWIND:
            return Progress(True, f"rewound to step {to_step}")
        if event.get("event") == REWIND_REFUSED:
            reason = event.get("reason") or "no reason given"
            return Progress(False, f"refused: {reason}", failed=True)
    return Progress(False, f"no rewind to step {to_step} yet: it happens at a step boundary")


def scale_applied(
    latest: RoundRecord | None, *, min_nodes: int, max_nodes: int, live_nodes: int
) -> Progress:
    wanted = (min_nodes, max_nodes)
    if latest is None:
        return Progress(False, "no round has formed yet")
    bounds = (latest.min_nodes, latest.max_nodes)
    if latest.closed and bounds == wanted:
        return Progress(
            True, f"round {latest.round} formed with {len(latest.participants)} node(s)"
        )
    if bounds == wanted:
        return Progress(
            False,
            f"round {latest.round} is forming under min {min_nodes}, max {max_nodes} "
            f"({live_nodes} live node(s))",
        )
    return Progress(
        False,
        f"round {latest.round} still runs under min {latest.min_nodes}, max {latest.max_nodes}: "
        "the group re-forms at its next step boundary",
    )


def wait(
    check: Callable[[], Progress],
    *,
    timeout_seconds: float,
    poll_seconds: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Progress:
    """Poll ``check`` until done or failed; past the deadline, the last answer (not done)."""
    deadline = clock() + timeout_seconds
    while True:
        progress = check()
        if progress.done or progress.failed:
            return progress
        left = deadline - clock()
        if left <= 0:
            return progress
        sleep(min(poll_seconds, left))


def _newest(events: Sequence[Mapping[str, Any]], kinds: set[str]) -> Mapping[str, Any] | None:
    matching = [e for e in events if e.get("event") in kinds]
    return max(matching, key=_seq) if matching else None


def _seq(event: Mapping[str, Any]) -> int:
    seq = event.get("seq")
    return seq if isinstance(seq, int) else 0
