"""CPU priority of the threads that write async saves.

An async save plans and writes in DCP's executor thread (and the write threads it starts)
while the trainer runs its next steps. Where the trainer's ranks keep every core busy, that
work takes CPU time from training; at a higher niceness it takes what the trainer leaves idle
first (waits in collectives, data loading) and runs at its full speed when nothing else wants
the core. Linux only: there niceness belongs to each thread and threads it starts inherit it.
Elsewhere ``setpriority`` on a thread id could name another process, so nothing is changed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading


class BackgroundPriority:
    """Lowers the priority of any thread but the one that created it (the trainer's)."""

    def __init__(self, nice: int) -> None:
        self.nice = nice
        self._owner = threading.get_ident()

    def apply(self) -> None:
        """Called at the start of background work: raise this thread's niceness to ``nice``.

        A no-op in the owning thread (a synchronous save runs there), for ``nice`` 0, off
        Linux, and where the OS refuses (the work then runs at the trainer's priority).
        """
        if self.nice <= 0 or threading.get_ident() == self._owner or sys.platform != "linux":
            return
        thread = threading.get_native_id()
        with contextlib.suppress(OSError):
            if os.getpriority(os.PRIO_PROCESS, thread) < self.nice:
                os.setpriority(os.PRIO_PROCESS, thread, self.nice)
