"""The daemon-worker protocol: every name, number and message shape both sides rely on.

The daemon (``daemon/``) and any training loop (the worker API in ``elastic.worker``, the
bundled trainer, or a loop in another language) meet only through what this module defines;
nothing else spells an exit code, a phase, an event name, an environment variable or a file
name of the protocol. ``docs/worker-protocol.md`` describes it for implementers elsewhere.

Channels, all local to one node:

- **environment** (daemon -> worker, at spawn): the torchrun contract (:data:`TORCHRUN_ENV`)
  plus :class:`Env` (the round directory, the node's name, the resolved config's path);
- **round directory** (``Env.WORKER_DIR``): ``heartbeat-<local_rank>.json`` written by the
  worker (:class:`Heartbeat`), ``control.json`` written by the daemon (:class:`Control`),
  ``error-<local_rank>.json`` written by torch's ``@record`` on an uncaught error;
- **stdout** (worker -> daemon): JSON lines, one object each, with an ``event`` field from
  :class:`Event`; the daemon relays every line and reads the metric fields of the events in
  :data:`METRIC_EVENTS`. Lines that are not JSON objects are kept as plain output;
- **stdin** (daemon -> standby worker): one line ``{"env": {...}}`` (:func:`standby_order`);
- **exit code** (worker -> daemon): :class:`ExitCode`; anything else is a failure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

__all__ = [
    "CLEAN_EXITS",
    "HEARTBEAT_GLOB",
    "METRIC_EVENTS",
    "SLOW_PHASES",
    "TORCHRUN_ENV",
    "Action",
    "Control",
    "Env",
    "Event",
    "ExitCode",
    "Heartbeat",
    "Phase",
    "control_file",
    "error_file",
    "heartbeat_file",
    "is_standby_ready",
    "parse_line",
    "read_standby_order",
    "standby_order",
    "standby_ready_line",
]


class ExitCode(IntEnum):
    """What a worker's exit status means to the daemon."""

    OK = 0  # training finished
    FAILED = 1  # an error escaped (traceback on stderr): restart, counted against the budget
    CONFIG = 2  # the worker rejected its configuration: the run stops (restarting cannot help)
    DIVERGED = 3  # the guard spent its rewind budget: the run stops as diverged
    DRAINED = 4  # a checkpoint was committed at a step boundary on request: not "done"


CLEAN_EXITS = frozenset({ExitCode.OK, ExitCode.DRAINED})


class Phase(StrEnum):
    """What a worker is doing, in its heartbeat. Slow phases get the start-up timeout."""

    START = "start"  # process started, process group forming
    LOAD = "load"  # restoring a checkpoint
    TRAIN = "train"  # stepping
    SAVE = "save"  # writing a checkpoint on the training path
    EVAL = "eval"  # evaluation between steps
    PAUSED = "paused"  # held at a step boundary by a pause request


SLOW_PHASES = frozenset({Phase.START, Phase.LOAD, Phase.SAVE, Phase.EVAL})


class Action(StrEnum):
    """Control requests, acted on at the next step boundary."""

    DRAIN = "drain"  # commit a checkpoint, exit ExitCode.DRAINED
    PAUSE = "pause"  # hold at the boundary (heartbeat phase PAUSED) until resume or drain
    RESUME = "resume"
    REWIND = "rewind"  # go back to the committed checkpoint ``to_step``


class Event(StrEnum):
    """``event`` values of the worker's stdout lines (and the daemon's own relays)."""

    STEP = "step"  # one per completed step, from global rank 0
    START = "start"  # training (re)started; resumed_from, world_size, start-up seconds
    DONE = "done"
    DRAIN = "drain"
    PAUSED = "paused"
    RESUMED = "resumed"
    STAGE = "stage"
    EVAL = "eval"  # losses: {source: loss}
    DIVERGENCE = "divergence"
    DIVERGED = "diverged"
    REWIND = "rewind"
    REWIND_REFUSED = "rewind_refused"
    CHECKPOINT_COMMIT = "checkpoint_commit"
    CHECKPOINT_LOAD = "checkpoint_load"
    CHECKPOINT_KNOWN_GOOD = "checkpoint_known_good"
    CHECKPOINT_SKIPPED = "checkpoint_skipped"
    CONFIG_CHANGED = "config_changed"
    FAULT_INJECTED = "fault_injected"
    METRICS = "metrics"  # a loop's own gauges: {"values": {name: number}}
    STANDBY_READY = "standby_ready"
    WORKER_OUTPUT = "worker_output"  # (daemon) a worker line that was not a JSON object


# Events whose fields feed the daemon's Prometheus series (daemon/metrics.py).
METRIC_EVENTS = frozenset(
    {
        Event.STEP,
        Event.EVAL,
        Event.DIVERGENCE,
        Event.REWIND,
        Event.DIVERGED,
        Event.CHECKPOINT_COMMIT,
        Event.CHECKPOINT_LOAD,
        Event.CHECKPOINT_KNOWN_GOOD,
    }
)


class Env(StrEnum):
    """elasticd's own environment variables of a worker (besides :data:`TORCHRUN_ENV`)."""

    WORKER_DIR = "ELASTICD_WORKER_DIR"  # the round directory (heartbeats, control, errors)
    NODE = "ELASTICD_WORKER_NODE"  # this node's name, for log lines
    CONFIG = "ELASTICD_WORKER_CONFIG"  # path of the resolved job config (YAML)
    ALLOW_FAULTS = "ELASTICD_ALLOW_FAULTS"  # "1": the config's `faults:` may fire
    # Set for one round only: restart a diverged run from this committed step (an operator's
    # `elasticctl rewind --to-step N` after `diverged`), instead of the newest checkpoint.
    RESTORE_STEP = "ELASTICD_WORKER_RESTORE_STEP"


def restore_step(environ: Mapping[str, str]) -> int | None:
    """The operator's restart step of a diverged run (:attr:`Env.RESTORE_STEP`), or None."""
    value = environ.get(Env.RESTORE_STEP, "")
    return int(value) if value else None


# The torch elastic contract, set for every worker exactly as torchrun sets it.
TORCHRUN_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_ERROR_FILE",
    "TORCHELASTIC_USE_AGENT_STORE",
)


HEARTBEAT_GLOB = "heartbeat-*.json"  # every local rank's heartbeat_file()


def heartbeat_file(local_rank: int) -> str:
    return f"heartbeat-{local_rank}.json"


def control_file() -> str:
    return "control.json"


def error_file(local_rank: int) -> str:
    return f"error-{local_rank}.json"


@dataclass(frozen=True)
class Heartbeat:
    """``heartbeat-<local_rank>.json``: replaced atomically by the worker."""

    local_rank: int
    step: int  # the newest completed step (the resumed-from step before the first)
    phase: Phase
    time_unix: float
    pid: int
    # Mean step compute time of the steps completed since the previous beat: from the start of
    # the step's body to the moment the rank enters the step's collective (the collective then
    # equalises every rank's wall time, so the time spent waiting in it is not counted). None
    # before the first step, and from loops that do not measure it (optional on the wire).
    compute_seconds: float | None = None
    # Tokens of the whole group's last step (every rank's share together), when the loop
    # reports them: the daemon derives its node's share of the throughput. Optional too.
    step_tokens: float | None = None
    # The rank's peak memory so far, in bytes: the CUDA caching allocator's high-water mark
    # (``torch.cuda.max_memory_allocated``) on a GPU, the process's peak RSS otherwise.
    # Optional on the wire (added after the first protocol version; old loops omit it).
    peak_memory_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "step": self.step,
            "phase": self.phase.value,
            "time_unix": self.time_unix,
            "pid": self.pid,
        }
        if self.compute_seconds is not None:
            payload["compute_seconds"] = self.compute_seconds
        if self.step_tokens is not None:
            payload["step_tokens"] = self.step_tokens
        if self.peak_memory_bytes is not None:
            payload["peak_memory_bytes"] = self.peak_memory_bytes
        return payload

    @classmethod
    def from_json(cls, local_rank: int, data: dict[str, Any]) -> Heartbeat:
        """Raises ValueError/KeyError/TypeError on a malformed beat."""
        compute, tokens = data.get("compute_seconds"), data.get("step_tokens")
        memory = data.get("peak_memory_bytes")
        return cls(
            local_rank,
            int(data["step"]),
            Phase(str(data["phase"])),
            float(data["time_unix"]),
            int(data["pid"]),
            None if compute is None else float(compute),
            None if tokens is None else float(tokens),
            None if memory is None else int(memory),
        )


@dataclass(frozen=True)
class Control:
    """``control.json``: replaced atomically by the daemon; ``seq`` grows by one per request."""

    seq: int
    action: Action
    to_step: int | None = None  # REWIND only
    time_unix: float = 0.0

    def to_json(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "seq": self.seq,
            "action": self.action.value,
            "time_unix": self.time_unix,
        }
        if self.to_step is not None:
            payload["to_step"] = self.to_step
        return payload

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Control:
        """Raises ValueError/KeyError/TypeError on a malformed request."""
        to_step = data.get("to_step")
        return cls(
            int(data["seq"]),
            Action(str(data["action"])),
            None if to_step is None else int(to_step),
            float(data.get("time_unix", 0.0)),
        )


def parse_line(line: str | bytes) -> dict[str, Any] | None:
    """A worker stdout line as a protocol record, or None when it is not a JSON object."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def standby_ready_line(warm_up_seconds: float) -> str:
    """The stdout line a standby worker prints once its imports are done."""
    return json.dumps(
        {
            "event": Event.STANDBY_READY.value,
            "ts": round(time.time(), 3),
            "warm_up_seconds": round(warm_up_seconds, 3),
        }
    )


def is_standby_ready(line: bytes) -> bool:
    """Whether a worker's stdout ``line`` is its standby-ready line."""
    record = parse_line(line)
    return record is not None and record.get("event") == Event.STANDBY_READY


def standby_order(env: dict[str, str]) -> bytes:
    """The one stdin line that hands a standby worker its round's environment."""
    return json.dumps({"env": env}).encode() + b"\n"


def read_standby_order(line: str) -> dict[str, str] | None:
    """The environment from a standby order; None when stdin closed (the pool was closed)."""
    if not line:
        return None
    env = json.loads(line)["env"]
    return {str(k): str(v) for k, v in env.items()}
