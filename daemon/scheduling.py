"""The daemon's CPU scheduling class: its threads never pre-empt training when they wake.

On a training node the workers keep the cores busy, and the daemon wakes often and briefly:
a worker's log line to relay, the watchdog's look at the heartbeats, an etcd watch event, a
scrape. Under Linux's normal policy a waking thread may pre-empt a running rank, and the
ranks, which step in lockstep, then all wait at the next collective for the one that was
pre-empted. Under ``SCHED_BATCH`` a waking thread never pre-empts: it runs when a core frees
up (a rank waiting in a collective or on I/O) or at the running task's next scheduling point,
and keeps the same fair share of CPU time as before, so supervision is delayed by
milliseconds at most, never starved (a hung or dead worker frees its core at once).

The class is per thread and inherited by threads and processes started after it is set: the
daemon sets it on its main thread before it starts anything (its threads and the embedded etcd
inherit it), and every worker it starts goes back to the normal policy before it runs
(:func:`as_worker`). Linux only; elsewhere, or where the call is refused, nothing changes.
"""

from __future__ import annotations

import os

__all__ = ["as_daemon", "as_worker", "policy_name"]


def as_daemon() -> bool:
    """Put the calling thread (and what it starts from now on) in ``SCHED_BATCH``;
    ``False`` where that is not possible."""
    return _set(getattr(os, "SCHED_BATCH", None))


def as_worker() -> bool:
    """Put the calling thread back in the normal policy (in a worker, before it runs)."""
    return _set(getattr(os, "SCHED_OTHER", None))


def policy_name(pid: int = 0) -> str:
    """``batch``, ``normal`` or ``other:<n>`` for ``pid`` (0: the calling thread)."""
    if not hasattr(os, "sched_getscheduler"):
        return "unknown"
    policy = os.sched_getscheduler(pid)
    names = {getattr(os, "SCHED_BATCH", -1): "batch", getattr(os, "SCHED_OTHER", -1): "normal"}
    return names.get(policy, f"other:{policy}")


def _set(policy: int | None) -> bool:
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True
