"""Control requests a worker has seen and not yet acted on (drain, pause, resume, rewind).

Requests arrive on each rank's own channel at slightly different times; they take effect only
once the step vote (:mod:`elastic.worker.vote`) has made every rank agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic.protocol import Action, Control


@dataclass
class ControlState:
    drain: bool = False
    pause: bool = False
    resume: bool = False
    rewind_to: int | None = None

    def take(self, control: Control | None) -> None:
        if control is None:
            return
        if control.action is Action.DRAIN:
            self.drain = True
        elif control.action is Action.PAUSE:
            self.pause, self.resume = True, False
        elif control.action is Action.RESUME:
            self.pause, self.resume = False, True
        elif control.action is Action.REWIND:
            self.rewind_to = control.to_step
