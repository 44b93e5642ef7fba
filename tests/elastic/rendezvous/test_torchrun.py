"""Plain torchrun with ``--rdzv-backend etcd3``: real agents (``python -m torch.distributed.run``)
on loopback and a real etcd run gloo all_reduces through a first round, a worker restart and
the loss of a node."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from elastic.rendezvous import RunKeys, connect
from elastic.rendezvous.records import RoundRecord, decode_round
from tests.elastic.rendezvous.conftest import etcd_config
from tests.support.etcd import EtcdServer

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = Path(__file__).with_name("_allreduce.py")
TIMEOUT_SECONDS = 120
NODE_LOSS_SECONDS = 120  # 15 s on an idle machine; a loaded one starts torch slowly
KEY_PREFIX = "/torchrun-test"
# Short last call and node lease, so rounds re-form within seconds.
CONF = f"last_call_timeout=1,join_timeout=60,key_prefix={KEY_PREFIX},node_ttl_seconds=5"

pytestmark = pytest.mark.slow

Record = dict[str, Any]


class Torchrun:
    """torchrun agents, each in its own process group; their workers' JSON lines land in one
    queue as ``(agent, record)`` and every output line is kept for failure messages."""

    def __init__(self, endpoint: str, run_id: str) -> None:
        self.endpoint, self.run_id = endpoint, run_id
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.output: dict[str, list[str]] = {}
        self.records: queue.Queue[tuple[str, Record]] = queue.Queue()
        self.seen: list[tuple[str, Record]] = []
        self._readers: list[threading.Thread] = []

    def start(
        self,
        name: str,
        *,
        nnodes: str,
        max_restarts: int = 0,
        conf: str = CONF,
        env: dict[str, str] | None = None,
    ) -> None:
        options = {
            "--rdzv-backend": "etcd3",
            "--rdzv-endpoint": self.endpoint,
            "--rdzv-id": self.run_id,
            "--rdzv-conf": conf,
            "--local-addr": "127.0.0.1",  # loopback only, whatever the host name resolves to
            "--nnodes": nnodes,
            "--nproc-per-node": "1",
            "--max-restarts": str(max_restarts),
            "--monitor-interval": "0.2",
        }
        cmd = [sys.executable, "-m", "torch.distributed.run"]
        cmd += [part for option in options.items() for part in option] + [str(SCRIPT)]
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: the test can kill the whole node
        )
        self.procs[name], self.output[name] = proc, []
        reader = threading.Thread(target=self._read, args=(name, proc), daemon=True)
        reader.start()
        self._readers.append(reader)

    def _read(self, name: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output[name].append(line)
            if line.startswith('{"event"'):
                with contextlib.suppress(ValueError):
                    self.records.put((name, json.loads(line)))

    def wait_for(
        self, match: Callable[[Record], bool], count: int, *, timeout_seconds: float
    ) -> dict[str, Record]:
        """The first record per agent that ``match``es, once ``count`` agents sent one."""
        found: dict[str, Record] = {}
        deadline = time.monotonic() + timeout_seconds
        while len(found) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"waited for {count} records, got {found}\n{self.tails()}"
            with contextlib.suppress(queue.Empty):
                name, record = self.records.get(timeout=min(remaining, 0.5))
                self.seen.append((name, record))
                if match(record):
                    found.setdefault(name, record)
        return found

    def wait_exit(self, names: list[str], *, timeout_seconds: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout_seconds
        codes = {}
        for name in names:
            try:
                codes[name] = self.procs[name].wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still running\n{self.tails()}") from None
        for reader in self._readers:
            reader.join(timeout=10)
        self._drain()
        return codes

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.seen.append(self.records.get_nowait())

    def all(self, event: str) -> list[tuple[str, Record]]:
        self._drain()
        return [(name, r) for name, r in self.seen if r.get("event") == event]

    def kill_node(self, name: str, worker_pid: int) -> None:
        """SIGKILL the agent's process group and its worker (torch starts workers in their own
        session): the node is gone at once, without a word to etcd."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def tails(self) -> str:
        return "\n\n".join(f"--- {n}\n{''.join(lines[-60:])}" for n, lines in self.output.items())

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for _, record in self.all("started"):  # workers outlive a killed agent
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(record["pid"]), signal.SIGKILL)


@pytest.fixture
def torchrun(etcd_server: EtcdServer, run_id: str) -> Iterator[Torchrun]:
    agents = Torchrun(etcd_server.endpoint, run_id)
    try:
        yield agents
    finally:
        agents.stop_all()


def latest_round(server: EtcdServer, run_id: str) -> RoundRecord:
    client = connect(etcd_config(server))
    try:
        key = RunKeys(KEY_PREFIX, run_id).round
        stored = client.get(key)
        assert stored is not None, f"no round record at {key}"
        return decode_round(key, stored.value)
    finally:
        client.close()


def test_entry_point_is_installed() -> None:
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="torchrun.handlers")}
    assert names.get("etcd3") == "elastic.rendezvous.torchrun:handler_factory", (
        "the etcd3 torchrun handler is not registered; run `pip install -e .`"
    )


def test_backend_registers_when_our_package_is_imported_before_torch() -> None:
    code = (
        "import elastic.rendezvous\n"
        "from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as r\n"
        "print('etcd3' in r._registry)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_two_torchrun_agents_run_an_all_reduce(
    torchrun: Torchrun, etcd_server: EtcdServer, run_id: str
) -> None:
    # torch's heartbeat knobs are accepted (and ignored): existing command lines keep working.
    conf = f"{CONF},keep_alive_interval=1,keep_alive_max_attempt=3,close_timeout=5"
    for name in ("a", "b"):
        torchrun.start(name, nnodes="2", conf=conf)
    codes = torchrun.wait_exit(["a", "b"], timeout_seconds=TIMEOUT_SECONDS)
    assert codes == {"a": 0, "b": 0}, torchrun.tails()
    reduces = torchrun.all("all_reduce")
    assert sorted(r["rank"] for _, r in reduces) == [0, 1]
    assert all(r["sum"] == 3.0 and r["world_size"] == 2 for _, r in reduces), reduces
    record = latest_round(etcd_server, run_id)
    assert (record.round, record.closed, len(record.participants)) == (1, True, 2)
    assert record.master_addr == "127.0.0.1"


def test_a_worker_that_fails_once_is_restarted_in_a_new_round_with_its_peer(
    torchrun: Torchrun, etcd_server: EtcdServer, run_id: str
) -> None:
    torchrun.start("failing", nnodes="2", max_restarts=1, env={"ALLREDUCE_FAIL_ONCE": "1"})
    torchrun.start("steady", nnodes="2", max_restarts=1)
    codes = torchrun.wait_exit(["failing", "steady"], timeout_seconds=TIMEOUT_SECONDS)
    assert codes == {"failing": 0, "steady": 0}, torchrun.tails()
    assert [name for name, _ in torchrun.all("failing")] == ["failing"]
    reduces = sorted(
        (name, r["restart"], r["world_size"], r["sum"]) for name, r in torchrun.all("all_reduce")
    )
    # The failed node used its restart; its peer re-rendezvoused for the newer round (a
    # membership change, not a restart of its own).
    assert reduces == [("failing", "1", 2, 3.0), ("steady", "0", 2, 3.0)], torchrun.tails()
    record = latest_round(etcd_server, run_id)
    assert (record.round, record.closed, len(record.participants)) == (2, True, 2)


def test_the_survivors_of_a_killed_node_finish_as_a_group_of_two(
    torchrun: Torchrun, etcd_server: EtcdServer, run_id: str, tmp_path: Path
) -> None:
    marker = tmp_path / "second-all-reduce"
    env = {"ALLREDUCE_HOLD_FILE": str(marker)}
    conf = CONF.replace("last_call_timeout=1", "last_call_timeout=3")  # let all three in
    names = ["a", "b", "c"]
    started = time.monotonic()
    for name in names:
        torchrun.start(name, nnodes="2:3", max_restarts=1, conf=conf, env=env)
    first = torchrun.wait_for(
        lambda r: r.get("event") == "all_reduce" and r.get("world_size") == 3,
        3,
        timeout_seconds=NODE_LOSS_SECONDS,
    )
    # The node whose worker is rank 0 hosts the workers' store: the next round needs a new one.
    victim = next(name for name, record in first.items() if record["rank"] == 0)
    torchrun.kill_node(victim, worker_pid=first[victim]["pid"])
    marker.touch()  # the survivors' second all_reduce meets the dead peer and fails
    earlier = {r["pid"] for _, r in torchrun.all("started")}
    survivors = [name for name in names if name != victim]
    remaining = NODE_LOSS_SECONDS - (time.monotonic() - started)
    codes = torchrun.wait_exit(survivors, timeout_seconds=remaining)
    elapsed = time.monotonic() - started
    assert codes == dict.fromkeys(survivors, 0), torchrun.tails()
    # Workers started after the kill: one each, restarted for their own failure or because
    # the peer's restart opened a newer round (a membership change, not counted as a restart).
    last = {name: r for name, r in torchrun.all("all_reduce") if r["pid"] not in earlier}
    assert sorted(last) == survivors, torchrun.tails()
    assert sorted(r["rank"] for r in last.values()) == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in last.values())
    record = latest_round(etcd_server, run_id)
    assert record.closed and len(record.participants) == 2
    assert elapsed < NODE_LOSS_SECONDS
    print(f"\nnode loss: three agents to the survivors' exit in {elapsed:.1f} s")
