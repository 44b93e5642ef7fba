"""This node's worker processes: spawn with the torch elastic env contract, relay, stop.

Workers run ``worker.command`` (any training loop) through the warm launcher
``python -P -m elastic.worker.standby -- COMMAND...``, which imports torch ahead of the round
(:class:`StandbyPool`). Their output is relayed line by line; the lines that are not protocol
records (prints, warnings, tracebacks) are also kept, the last few per worker, for the failure
report in the node's status.

Why not ``torch.distributed.elastic.multiprocessing.start_processes``: the daemon must relay
every worker line live, tagged with node and rank, and stop a whole process tree at once; that
API tees to files and owns the signal handling. We keep its conventions instead: the same env
contract, one error file per worker (``TORCHELASTIC_ERROR_FILE``, filled by torch's ``@record``
in the worker), and exit codes read the same way (negative = killed by that signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from daemon import scheduling
from daemon.config import WorkerConfig
from elastic.config import WORKER_ENV_PREFIX
from elastic.protocol import Env, Event, error_file, is_standby_ready, parse_line, standby_order

LAUNCHER = ("-P", "-m", "elastic.worker.standby", "--")
TAIL_LINES = 20  # plain output lines kept per worker, for the failure report
TAIL_LINE_CHARS = 200  # each cut to this: the report travels in the node's status in etcd
LOG_TAIL_LINES = 5  # of which the worker_exit log line carries this many


@dataclass(frozen=True)
class RoundAssignment:
    """What one round tells this node: its place in the group and where the store is."""

    round_id: int
    group_rank: int  # this node's rank among nodes
    num_nodes: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    restart_count: int

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.nproc_per_node


@dataclass(frozen=True)
class WorkerExit:
    local_rank: int
    returncode: int

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"


def worker_env(
    base: Mapping[str, str],
    assignment: RoundAssignment,
    *,
    local_rank: int,
    run_id: str,
    node: str,
    worker_dir: Path,
    config_path: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The daemon's env, then ``extra`` (``worker.env``), then the torch elastic env contract
    and elasticd's worker channel, which win."""
    rank = assignment.group_rank * assignment.nproc_per_node + local_rank
    env = {k: v for k, v in base.items() if not _is_config_env(k)}
    env.update(extra or {})
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(assignment.world_size),
        LOCAL_WORLD_SIZE=str(assignment.nproc_per_node),
        GROUP_RANK=str(assignment.group_rank),
        GROUP_WORLD_SIZE=str(assignment.num_nodes),
        ROLE_RANK=str(rank),
        ROLE_WORLD_SIZE=str(assignment.world_size),
        ROLE_NAME="default",
        MASTER_ADDR=assignment.master_addr,
        MASTER_PORT=str(assignment.master_port),
        TORCHELASTIC_RUN_ID=run_id,
        TORCHELASTIC_RESTART_COUNT=str(assignment.restart_count),
        TORCHELASTIC_ERROR_FILE=str(worker_dir / error_file(local_rank)),
        TORCHELASTIC_USE_AGENT_STORE="False",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        PYTHONUNBUFFERED="1",
    )
    env[Env.WORKER_DIR.value] = str(worker_dir)
    env[Env.NODE.value] = node
    env[Env.CONFIG.value] = config_path
    return env


def die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the daemon dies, however it dies.

    A daemon killed by SIGKILL (OOM killer, node failure drill) must not leave workers behind
    holding GPUs and ports. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


PR_SET_PDEATHSIG = 1


def _in_worker() -> None:
    """Runs in a worker before exec: dies with the daemon, and trains under the normal CPU
    policy, not the daemon's (:mod:`daemon.scheduling`)."""
    die_with_parent()
    scheduling.as_worker()


def _is_config_env(name: str) -> bool:
    # The resolved document already holds every override; workers must not re-apply them.
    return (
        name.startswith("ELASTICD_")
        and not name.startswith(WORKER_ENV_PREFIX)
        and name != Env.ALLOW_FAULTS
    )


class StandbyPool:
    """Worker processes started ahead of the next round, with Python and torch imported.

    ``import torch`` and the DCP/FSDP modules cost seconds per process; a restart that spawns
    fresh workers pays it on the critical path. A standby process (the launcher
    ``elastic.worker.standby`` with ``worker.command`` after ``--``) imports them, then blocks
    on stdin until a round hands it its env, then runs the command: in the same process when it
    is a Python module or script of this interpreter, else by ``exec`` (cold, but the same
    protocol). It holds no distributed state, so it is as fresh as a new process.
    """

    def __init__(
        self,
        *,
        worker: WorkerConfig,
        config_path: str,
        base_env: Mapping[str, str],
        size: int,
    ) -> None:
        self.command = worker.argv(python=sys.executable, config_path=config_path)
        self._args = [sys.executable, *LAUNCHER, *self.command]
        self._cwd = worker.cwd or None
        self._env = {k: v for k, v in base_env.items() if not _is_config_env(k)}
        self._env.update(worker.env)
        self._env.setdefault("OMP_NUM_THREADS", "1")
        self._env["PYTHONUNBUFFERED"] = "1"
        self._size = size
        self._ready: list[subprocess.Popen[bytes]] = []
        self._warm: set[int] = set()  # pids seen ready by wait_ready()

    def spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._args,
            cwd=self._cwd,
            env=self._env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we stop the whole tree
            preexec_fn=_in_worker,
        )

    def fill(self) -> None:
        """Top the pool up (called once a round is training, off the restart path)."""
        self._ready = [p for p in self._ready if p.poll() is None]
        self._warm.intersection_update(p.pid for p in self._ready)
        while len(self._ready) < self._size:
            self._ready.append(self.spawn())

    def wait_ready(
        self,
        count: int,
        *,
        timeout_seconds: float,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Wait until the next ``count`` processes have finished importing (their
        ``standby_ready`` line; anything printed before it is dropped). A node that is about to
        join a running group waits here, so the group's pause does not include this node's
        imports. False at the deadline (they are used anyway, just not warm yet)."""
        deadline = time.monotonic() + timeout_seconds
        for proc in self._ready[:count]:
            assert proc.stdout is not None
            # The pipe's fd, not the buffered reader: readline() would pull several lines
            # into its buffer, where select() no longer sees them (the ready line waited for
            # the deadline). Nothing comes after the ready line until the process gets its env.
            fd, pending = proc.stdout.fileno(), b""
            while proc.poll() is None and proc.pid not in self._warm:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or should_stop():
                    return False
                readable, _, _ = select.select([fd], [], [], min(remaining, 0.2))
                *lines, pending = (pending + (os.read(fd, 65536) if readable else b"")).split(b"\n")
                if any(is_standby_ready(line) for line in lines):
                    self._warm.add(proc.pid)
        return True

    def take(self) -> tuple[subprocess.Popen[bytes], bool]:
        """A live process, and whether :meth:`wait_ready` consumed its ready line (warm); else
        its ready line is still to come on its stdout. Cold when none is left (same protocol)."""
        while self._ready:
            proc = self._ready.pop(0)
            warm = proc.pid in self._warm
            self._warm.discard(proc.pid)
            if proc.poll() is None:
                return proc, warm
        return self.spawn(), False

    def close(self) -> None:
        for proc in self._ready:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self._ready = []


class WorkerGroup:
    """``nproc_per_node`` worker processes of one round, their relays and their exit codes.

    Per worker it also keeps the last :data:`TAIL_LINES` plain output lines (:meth:`tail`) and
    when it last printed (:meth:`last_output`): a loop without the worker API writes no
    heartbeat, and its output is all the daemon can watch and report. Output counts from the
    launcher's ready line on; what the launcher printed while importing says nothing of the
    loop.
    """

    def __init__(
        self,
        *,
        pool: StandbyPool,
        envs: list[dict[str, str]],
        node: str,
        out: TextIO = sys.stdout,
        on_line: Callable[[int, dict[str, Any]], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.command = pool.command
        self._printer = structlog.PrintLogger(file=out)
        self._node = node
        self._on_line = on_line
        self._on_exit = on_exit
        self._clock = clock
        self._procs: list[subprocess.Popen[bytes]] = []
        self._relays: list[threading.Thread] = []
        self._tails: list[deque[str]] = [deque(maxlen=TAIL_LINES) for _ in envs]
        # Written by the relay threads, read by the monitor: one float per slot, replaced whole.
        self._last_output: list[float | None] = [None] * len(envs)
        for local_rank, env in enumerate(envs):
            proc, warm = pool.take()
            assert proc.stdin is not None
            # The round's env: the only thing a standby process waits for.
            proc.stdin.write(standby_order(env))
            proc.stdin.close()
            self._procs.append(proc)
            relay = threading.Thread(
                target=self._relay,
                args=(local_rank, int(env["RANK"]), proc, warm),
                daemon=True,
            )
            relay.start()
            self._relays.append(relay)

    @property
    def pids(self) -> list[int]:
        """Worker process ids, by local rank."""
        return [p.pid for p in self._procs]

    def tail(self, local_rank: int) -> list[str]:
        """The worker's last plain output lines (not protocol records), oldest first."""
        return list(self._tails[local_rank])

    def last_output(self, local_rank: int) -> float | None:
        """Clock time of the worker's last output line; None when it printed nothing yet."""
        return self._last_output[local_rank]

    def silent_seconds(self, now: float) -> float | None:
        """Since the newest output line of any of the workers, by the injected clock; None
        while none has printed. Any, not each: in a loop where only global rank 0 prints,
        the other ranks are quiet, not stuck, and a stuck group silences rank 0 too."""
        printed = [t for t in self._last_output if t is not None]
        return now - max(printed) if printed else None

    def failure(self, worker_exit: WorkerExit) -> dict[str, Any]:
        """What ``elasticctl status`` shows of a failed worker."""
        tail = self.tail(worker_exit.local_rank)
        return failure_report(command=self.command, worker_exit=worker_exit, output_tail=tail)

    def poll(self) -> list[WorkerExit]:
        """Exits so far (any order); empty while all run."""
        return [
            WorkerExit(i, code) for i, p in enumerate(self._procs) if (code := p.poll()) is not None
        ]

    def all_exited(self) -> bool:
        return all(p.poll() is not None for p in self._procs)

    def wait(self, timeout_seconds: float) -> bool:
        deadline = time.monotonic() + timeout_seconds
        while not self.all_exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, *, grace_seconds: float = 3.0) -> None:
        """SIGTERM the process groups, SIGKILL what is left after the grace period."""
        self._signal_all(signal.SIGCONT)  # a SIGSTOPped worker cannot act on SIGTERM
        self._signal_all(signal.SIGTERM)
        if not self.wait(grace_seconds):
            self._signal_all(signal.SIGKILL)
            self.wait(10.0)
        for relay in self._relays:
            relay.join(timeout=2.0)

    def _signal_all(self, sig: signal.Signals) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)

    def _relay(self, local_rank: int, rank: int, proc: subprocess.Popen[bytes], warm: bool) -> None:
        assert proc.stdout is not None
        running = warm  # the loop runs after the launcher's ready line
        for raw in proc.stdout:
            if running:
                self._last_output[local_rank] = self._clock()
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            record = parse_line(line)
            if record is not None and record.get("event") == Event.STANDBY_READY:
                running = True
            if record is None:
                self._tails[local_rank].append(line[:TAIL_LINE_CHARS])
                record = {"event": Event.WORKER_OUTPUT.value, "text": line}
            record.setdefault("node", self._node)
            record.setdefault("rank", rank)
            record.setdefault("local_rank", local_rank)
            if self._on_line is not None:
                self._on_line(local_rank, record)
            # structlog's printer: one lock per file, shared with the daemon's own log lines,
            # which would otherwise interleave with this one (print writes text and newline
            # apart) and corrupt both lines.
            self._printer.msg(json.dumps(record))
        if self._on_exit is not None:
            # Output ended: the worker is exiting. Reap it so poll() sees the code, then tell
            # the supervisor now instead of at its next poll tick.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
            self._on_exit(local_rank)


def failure_report(
    *, command: Sequence[str], worker_exit: WorkerExit, output_tail: Sequence[str]
) -> dict[str, Any]:
    """A failed worker as the node's status shows it: what ran, how it ended, what it said."""
    return {
        "command": list(command),
        "local_rank": worker_exit.local_rank,
        "returncode": worker_exit.returncode,
        "output_tail": list(output_tail)[-TAIL_LINES:],
    }


def read_error_file(worker_dir: Path, local_rank: int) -> str | None:
    """The worker's root cause from torch's error file, if it wrote one."""
    path = worker_dir / error_file(local_rank)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    message = data.get("message", {})
    if isinstance(message, dict):
        return str(message.get("message", ""))[:500] or None
    return str(message)[:500] or None
