"""The local channel between a node's daemon and its worker processes: heartbeats and control.

The file formats, names and actions are defined in :mod:`elastic.protocol`; this module does the
I/O. A directory per round (``Env.WORKER_DIR``) holds

- ``heartbeat-<local_rank>.json`` (:class:`~elastic.protocol.Heartbeat`), replaced atomically
  by the worker at every phase change and after a step, at most once per
  ``BEAT_INTERVAL_SECONDS`` while the phase stays the same; the daemon's watchdog reads it;
- ``control.json`` (:class:`~elastic.protocol.Control`) written atomically by the daemon;
  workers poll it once per step (one ``stat``) and act at the next step boundary.

Files, not sockets: both sides survive the other's restart, and a worker stuck in a collective
simply stops beating, which is exactly what the watchdog must see.

Why beats are rate-limited: the atomic replace costs ~0.6 ms on ext4 (replacing a file by
rename starts a writeback of the new file, ``auto_da_alloc``), on the training thread, and the
daemon reads the files only every ``watchdog.poll_seconds`` (0.5 s by default) against a hang
timeout of a minute; writing on every step of a fast model bought nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from elastic.files import replace_file
from elastic.protocol import (
    HEARTBEAT_GLOB,
    Action,
    Control,
    Heartbeat,
    Phase,
    control_file,
    heartbeat_file,
)

BEAT_INTERVAL_SECONDS = 0.5
CONTROL_RECENT_SECONDS = 1.0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


class WorkerChannel:
    """Worker side. With no directory (standalone or under torchrun) every call is a no-op."""

    def __init__(
        self,
        directory: str | None,
        *,
        local_rank: int,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        min_interval_seconds: float = BEAT_INTERVAL_SECONDS,
    ) -> None:
        self._dir = Path(directory) if directory else None
        self._local_rank = local_rank
        self._clock = clock
        self._monotonic = monotonic
        self._min_interval_seconds = min_interval_seconds
        self._written: tuple[int, Phase, float] | None = None  # step, phase, monotonic time
        self._compute: list[float] = []  # step compute times not yet published
        self._step_tokens: float | None = None  # the group's tokens of the newest step
        self._peak_memory_bytes: int | None = None  # this rank's, newest
        self._control_mtime_ns = -1
        self._last_seq = 0

    @property
    def attached(self) -> bool:
        """Whether a daemon is on the other side."""
        return self._dir is not None

    def beat(
        self,
        step: int,
        phase: Phase = Phase.TRAIN,
        *,
        compute_seconds: float | None = None,
        step_tokens: float | None = None,
        peak_memory_bytes: int | None = None,
    ) -> None:
        """Publish (step, phase): at once on a new phase or a step back, else rate-limited.

        ``compute_seconds`` (one step's compute time) is kept until the next written beat,
        which publishes the mean of the kept ones: a rate-limited beat loses no step's time.
        ``step_tokens``: the group's tokens of the step, ``peak_memory_bytes``: this rank's
        peak memory (the newest of each is published).
        """
        if self._dir is None:
            return
        if compute_seconds is not None:
            self._compute.append(compute_seconds)
        if step_tokens is not None:
            self._step_tokens = step_tokens
        if peak_memory_bytes is not None:
            self._peak_memory_bytes = peak_memory_bytes
        now = self._monotonic()
        if self._written is not None:
            last_step, last_phase, last_time = self._written
            if (
                phase == last_phase
                and step >= last_step
                and now - last_time < self._min_interval_seconds
            ):
                return
        compute = sum(self._compute) / len(self._compute) if self._compute else None
        beat = Heartbeat(
            self._local_rank,
            step,
            Phase(phase),
            self._clock(),
            os.getpid(),
            compute,
            self._step_tokens,
            self._peak_memory_bytes,
        )
        payload = json.dumps(beat.to_json()).encode()
        replace_file(self._dir / heartbeat_file(self._local_rank), payload)
        self._written = (step, Phase(phase), now)
        self._compute.clear()

    def poll(self) -> Control | None:
        """A control request not seen before, or None (one stat when nothing changed)."""
        if self._dir is None:
            return None
        path = self._dir / control_file()
        try:
            mtime_ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        # mtime ticks with the kernel's coarse clock (ms): a second request written in the
        # same tick keeps the mtime, so a file changed recently is read again (seq dedups).
        recent = self._clock() - mtime_ns / 1e9 < CONTROL_RECENT_SECONDS
        if mtime_ns == self._control_mtime_ns and not recent:
            return None
        self._control_mtime_ns = mtime_ns
        data = _read_json(path)
        try:
            control = Control.from_json(data) if data is not None else None
        except (KeyError, TypeError, ValueError):
            return None
        if control is None or control.seq <= self._last_seq:
            return None
        self._last_seq = control.seq
        return control


class DaemonChannel:
    """Daemon side: creates the round directory, reads heartbeats, writes control requests."""

    def __init__(self, directory: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._seq = 0

    def heartbeats(self) -> dict[int, Heartbeat]:
        beats: dict[int, Heartbeat] = {}
        for path in self.directory.glob(HEARTBEAT_GLOB):
            data = _read_json(path)
            if data is None:
                continue
            try:
                local_rank = int(path.stem.split("-", 1)[1])
                beats[local_rank] = Heartbeat.from_json(local_rank, data)
            except (KeyError, TypeError, ValueError):
                continue  # a malformed beat is no beat: the watchdog judges by the rest
        return beats

    def send(self, action: Action | str, *, to_step: int | None = None) -> int:
        try:
            checked = Action(action)
        except ValueError:
            allowed = sorted(a.value for a in Action)
            raise ValueError(f"action={action!r}: must be one of {allowed}") from None
        self._seq += 1
        control = Control(self._seq, checked, to_step, self._clock())
        replace_file(self.directory / control_file(), json.dumps(control.to_json()).encode())
        return self._seq
