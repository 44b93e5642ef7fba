"""Fault hooks of the worker API: where each configured ``faults:`` kind acts on a loop.

The decision of whether a fault fires (and the "at most ``times`` per run" record) belongs to
:class:`elastic.faults.FaultInjector`; this module applies the firing to a training loop
outside its step: ``crash_on_start`` before the first step, ``kill`` / ``hang`` /
``lr_spike`` before a step, ``nan`` on the loss the loop reports, ``slow`` inside the step
before its collective (:meth:`Drills.in_step`: the sleep counts as the rank's compute time).
``poison_batch`` changes the loop's own data, so the loop asks for it (:meth:`Drills.poison`)
and applies it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from elastic.faults import FaultConfig, FaultInjector
from elastic.protocol import Event
from elastic.worker.ledger import LrWindow

CRASH_ON_START_EXIT = 13


@dataclass(frozen=True)
class SlowWindow:
    """Extra compute per step over steps [start_step, end_step) (the ``slow`` fault)."""

    start_step: int
    end_step: int | None  # exclusive; None: to the end of training
    seconds: float

    def covers(self, step: int) -> bool:
        return self.start_step <= step and (self.end_step is None or step < self.end_step)


class Drills:
    def __init__(
        self,
        injector: FaultInjector,
        *,
        log: Any,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._injector = injector
        self._log = log
        self._sleep = sleep
        self.spikes: list[LrWindow] = []
        self.slow: list[SlowWindow] = []

    def at_start(self, step: int) -> None:
        if self._injector.due("crash_on_start") is not None:
            self._fired("crash_on_start", step)
            os._exit(CRASH_ON_START_EXIT)

    def before_step(self, step: int) -> None:
        spike = self._injector.due("lr_spike", step)
        if spike is not None:
            self.spikes.append(LrWindow(step, step + spike.duration_steps, spike.factor))
            self._fired("lr_spike", step)
        slow = self._injector.due("slow", step)
        if slow is not None:
            end_step = step + slow.steps if slow.steps else None
            self.slow.append(SlowWindow(step, end_step, slow.ms / 1000.0))
            self._fired("slow", step)
        if self._injector.due("kill", step) is not None:
            self._fired("kill", step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._injector.due("hang", step) is not None:
            self._fired("hang", step)
            while True:  # no heartbeat from here on: the daemon's watchdog must notice
                time.sleep(3600)

    def in_step(self, step: int) -> None:
        """Inside ``step``, before its collective: a ``slow`` window's extra compute."""
        seconds = sum(w.seconds for w in self.slow if w.covers(step))
        if seconds > 0:
            self._sleep(seconds)

    def nan(self, step: int) -> bool:
        """Whether the loss of ``step`` is to be reported as NaN (fires once)."""
        if self._injector.due("nan", step) is None:
            return False
        self._fired("nan", step)
        return True

    def poison(self, step: int) -> FaultConfig | None:
        """The ``poison_batch`` fault due at ``step`` on this rank, if any (fires once)."""
        fault = self._injector.due("poison_batch", step)
        if fault is not None:
            self._fired("poison_batch", step)
        return fault

    def lr_factor(self, step: int) -> float:
        factor = 1.0
        for window in self.spikes:
            if window.start_step <= step < window.end_step:
                factor *= window.factor
        return factor

    def forget_after(self, step: int) -> None:
        """A rewind to ``step``: an lr_spike or slow window that started later belongs to the
        abandoned stretch; it fired (and was recorded) once, the replay re-fires it only if its
        ``times`` allow."""
        self.spikes = [w for w in self.spikes if w.start_step <= step]
        self.slow = [w for w in self.slow if w.start_step <= step]

    def _fired(self, kind: str, step: int) -> None:
        """From the rank that fires it (often not rank 0), flushed before the fault acts."""
        self._log.warning(Event.FAULT_INJECTED.value, kind=kind, step=step)
        sys.stdout.flush()
