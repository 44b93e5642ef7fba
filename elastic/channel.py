"""The local channel between a node's daemon and its worker processes: heartbeats and control.

A directory per round (the daemon passes it to workers as ``ELASTICD_WORKER_DIR``) holds

- ``heartbeat-<local_rank>.json``: ``{"step", "phase", "time_unix", "pid"}``, replaced
  atomically by the worker at every phase change (``start``, ``load``, ``train``, ``save``,
  ``eval``, ``paused``) and after a step, at most once per ``BEAT_INTERVAL_SECONDS`` while the
  phase stays the same; the daemon's watchdog reads it;
- ``control.json``: ``{"seq", "action", ...}`` written atomically by the daemon; workers poll it
  once per step (one ``stat``) and act at the next step boundary. Actions: ``drain`` (commit a
  checkpoint and exit 0), ``pause``, ``resume``, ``rewind`` (``to_step``).

A standby worker (started before its round, see ``daemon.workers.StandbyPool``) says it has
finished importing with one JSON line on stdout, ``{"event": "standby_ready", ...}``
(:func:`standby_ready_line`, :func:`is_standby_ready`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.files import replace_file

WORKER_DIR_ENV = "ELASTICD_WORKER_DIR"
STANDBY_READY_EVENT = "standby_ready"
CONTROL_FILE = "control.json"
CONTROL_ACTIONS = frozenset({"drain", "pause", "resume", "rewind"})
BEAT_INTERVAL_SECONDS = 0.5
CONTROL_RECENT_SECONDS = 1.0


@dataclass(frozen=True)
class Heartbeat:
    local_rank: int
    step: int
    phase: str
    time_unix: float
    pid: int


@dataclass(frozen=True)
class Control:
    seq: int
    action: str
    to_step: int | None = None


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
        self._written: tuple[int, str, float] | None = None  # step, phase, monotonic time
        self._control_mtime_ns = -1
        self._last_seq = 0

    def beat(self, step: int, phase: str = "train") -> None:
        """Publish (step, phase): at once on a new phase or a step back, else rate-limited."""
        if self._dir is None:
            return
        now = self._monotonic()
        if self._written is not None:
            last_step, last_phase, last_time = self._written
            if (
                phase == last_phase
                and step >= last_step
                and now - last_time < self._min_interval_seconds
            ):
                return
        payload = {"step": step, "phase": phase, "time_unix": self._clock(), "pid": os.getpid()}
        replace_file(self._dir / f"heartbeat-{self._local_rank}.json", json.dumps(payload).encode())
        self._written = (step, phase, now)

    def poll(self) -> Control | None:
        """A control request not seen before, or None (one stat when nothing changed)."""
        if self._dir is None:
            return None
        path = self._dir / CONTROL_FILE
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
        if data is None or int(data.get("seq", 0)) <= self._last_seq:
            return None
        self._last_seq = int(data["seq"])
        to_step = data.get("to_step")
        action = str(data.get("action"))
        return Control(self._last_seq, action, None if to_step is None else int(to_step))


class DaemonChannel:
    """Daemon side: creates the round directory, reads heartbeats, writes control requests."""

    def __init__(self, directory: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._seq = 0

    def heartbeats(self) -> dict[int, Heartbeat]:
        beats: dict[int, Heartbeat] = {}
        for path in self.directory.glob("heartbeat-*.json"):
            data = _read_json(path)
            if data is None:
                continue
            local_rank = int(path.stem.split("-", 1)[1])
            beats[local_rank] = Heartbeat(
                local_rank,
                int(data["step"]),
                str(data["phase"]),
                float(data["time_unix"]),
                int(data["pid"]),
            )
        return beats

    def send(self, action: str, *, to_step: int | None = None) -> int:
        if action not in CONTROL_ACTIONS:
            raise ValueError(f"action={action!r}: must be one of {sorted(CONTROL_ACTIONS)}")
        self._seq += 1
        payload: dict[str, Any] = {"seq": self._seq, "action": action, "time_unix": self._clock()}
        if to_step is not None:
            payload["to_step"] = to_step
        replace_file(self.directory / CONTROL_FILE, json.dumps(payload).encode())
        return self._seq


def standby_ready_line(warm_up_seconds: float) -> str:
    """The stdout line a standby worker prints once its imports are done."""
    return json.dumps(
        {
            "event": STANDBY_READY_EVENT,
            "ts": round(time.time(), 3),
            "warm_up_seconds": round(warm_up_seconds, 3),
        }
    )


def is_standby_ready(line: bytes) -> bool:
    """Whether a worker's stdout ``line`` is its standby-ready line."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("event") == STANDBY_READY_EVENT
