"""This node's worker processes: spawn with the torch elastic env contract, relay, stop.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from elastic.channel import WORKER_DIR_ENV, is_standby_ready

WORKER_MODULE = "model.train"
NODE_ENV = "ELASTICD_WORKER_NODE"


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
) -> dict[str, str]:
    """The torch elastic env contract plus elasticd's worker channel."""
    rank = assignment.group_rank * assignment.nproc_per_node + local_rank
    env = {k: v for k, v in base.items() if not _is_config_env(k)}
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
        TORCHELASTIC_ERROR_FILE=str(worker_dir / f"error-{local_rank}.json"),
        TORCHELASTIC_USE_AGENT_STORE="False",
        OMP_NUM_THREADS=base.get("OMP_NUM_THREADS", "1"),
        PYTHONUNBUFFERED="1",
    )
    env[WORKER_DIR_ENV] = str(worker_dir)
    env[NODE_ENV] = node
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


def _is_config_env(name: str) -> bool:
    # The resolved document already holds every override; workers must not re-apply them.
    return (
        name.startswith("ELASTICD_")
        and not name.startswith("ELASTICD_WORKER_")
        and name != "ELASTICD_ALLOW_FAULTS"
    )


class StandbyPool:
    """Worker processes started ahead of the next round, with Python and torch imported.

    ``import torch`` and the DCP/FSDP modules cost seconds per process; a restart that spawns
    fresh workers pays it on the critical path. A standby process (``python -m model.train
    --standby``) imports everything, then blocks on stdin until a round hands it its env. It
    holds no distributed state, so it is as fresh as a new process.
    """

    def __init__(self, *, config_path: Path, base_env: Mapping[str, str], size: int) -> None:
        self._args = [
            sys.executable,
            "-m",
            WORKER_MODULE,
            "--config",
            str(config_path),
            "--standby",
        ]
        self._env = {k: v for k, v in base_env.items() if not _is_config_env(k)}
        self._env.setdefault("OMP_NUM_THREADS", "1")
        self._env["PYTHONUNBUFFERED"] = "1"
        self._size = size
        self._ready: list[subprocess.Popen[bytes]] = []
        self._warm: set[int] = set()  # pids seen ready by wait_ready()

    def spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._args,
            env=self._env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we stop the whole tree
            preexec_fn=die_with_parent,
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

    def take(self) -> subprocess.Popen[bytes]:
        """A warm process if one is alive, else a cold one (same protocol either way)."""
        while self._ready:
            proc = self._ready.pop(0)
            self._warm.discard(proc.pid)
            if proc.poll() is None:
                return proc
        return self.spawn()

    def close(self) -> None:
        for proc in self._ready:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self._ready = []


class WorkerGroup:
    """``nproc_per_node`` worker processes of one round, their relays and their exit codes."""

    def __init__(
        self,
        *,
        pool: StandbyPool,
        envs: list[dict[str, str]],
        node: str,
        out: TextIO = sys.stdout,
        on_line: Callable[[int, dict[str, Any]], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self._printer = structlog.PrintLogger(file=out)
        self._node = node
        self._on_line = on_line
        self._on_exit = on_exit
        self._procs: list[subprocess.Popen[bytes]] = []
        self._relays: list[threading.Thread] = []
        for local_rank, env in enumerate(envs):
            proc = pool.take()
            assert proc.stdin is not None
            # The round's env: the only thing a standby process waits for.
            proc.stdin.write(json.dumps({"env": env}).encode() + b"\n")
            proc.stdin.close()
            self._procs.append(proc)
            relay = threading.Thread(
                target=self._relay, args=(local_rank, int(env["RANK"]), proc), daemon=True
            )
            relay.start()
            self._relays.append(relay)

    @property
    def pids(self) -> list[int]:
        """Worker process ids, by local rank."""
        return [p.pid for p in self._procs]

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

    def _relay(self, local_rank: int, rank: int, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            record = _parse(line)
            if record is None:
                record = {"event": "worker_output", "text": line}
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


def _parse(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_error_file(worker_dir: Path, local_rank: int) -> str | None:
    """The worker's root cause from torch's error file, if it wrote one."""
    path = worker_dir / f"error-{local_rank}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    message = data.get("message", {})
    if isinstance(message, dict):
        return str(message.get("message", ""))[:500] or None
    return str(message)[:500] or None
