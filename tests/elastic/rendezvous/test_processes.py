"""Real processes on a real etcd: agents losing and gaining members, node lease departures."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elastic.rendezvous import NodeEvent, NodeWatch, connect
from tests.elastic.rendezvous.conftest import etcd_config
from tests.support.etcd import EtcdServer

ROOT = Path(__file__).resolve().parents[3]
WAIT_SECONDS = 60.0

pytestmark = pytest.mark.slow


class Agents:
    """Agent subprocesses whose JSON stdout lines land in one queue as (name, record)."""

    def __init__(self, endpoint: str, run_id: str) -> None:
        self.endpoint = endpoint
        self.run_id = run_id
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.lines: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        cmd = [
            sys.executable,
            "-m",
            "tests.elastic.rendezvous._agent",
            "--endpoint",
            self.endpoint,
            "--run-id",
            self.run_id,
            "--node-id",
            name,
            *args,
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        self.procs[name] = proc
        threading.Thread(target=self._read, args=(name, proc), daemon=True).start()
        return proc

    def _read(self, name: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                self.lines.put((name, json.loads(line)))

    def wait_for(self, event: str, count: int, **match: Any) -> list[tuple[str, dict[str, Any]]]:
        """The first ``count`` records with ``event`` and the ``match`` fields, from distinct
        agents; fails after WAIT_SECONDS."""
        found: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + WAIT_SECONDS
        while len(found) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"waited for {count} x {event} {match}, got {found}"
            try:
                name, record = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if record.get("event") == event and all(record.get(k) == v for k, v in match.items()):
                found[name] = record
        return sorted(found.items())

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def agents(etcd_server: EtcdServer, run_id: str) -> Iterator[Agents]:
    group = Agents(etcd_server.endpoint, run_id)
    try:
        yield group
    finally:
        group.stop_all()


def test_group_shrinks_when_an_agent_is_killed_and_grows_when_one_joins(agents: Agents) -> None:
    bounds = ("--min-nodes", "2", "--max-nodes", "3", "--ttl-seconds", "2")
    for name in ("a", "b", "c"):
        agents.start(name, *bounds)
    first = agents.wait_for("round", 3, world_size=3)
    assert sorted(r["rank"] for _, r in first) == [0, 1, 2]
    assert len({r["round"] for _, r in first}) == 1

    agents.procs["c"].send_signal(signal.SIGKILL)
    second = agents.wait_for("round", 2, world_size=2)
    assert [name for name, _ in second] == ["a", "b"]
    assert len({r["round"] for _, r in second}) == 1
    assert second[0][1]["round"] > first[0][1]["round"]

    agents.start("d", *bounds)
    third = agents.wait_for("round", 3, world_size=3)
    assert [name for name, _ in third] == ["a", "b", "d"]
    assert len({r["round"] for _, r in third}) == 1
    assert third[0][1]["round"] > second[0][1]["round"]


def test_node_departures_arrive_within_the_lease_ttl(etcd_server: EtcdServer, run_id: str) -> None:
    ttl_seconds = 2.0
    agents = Agents(etcd_server.endpoint, run_id)
    client = connect(etcd_config(etcd_server))
    watch = NodeWatch(client, run_id=run_id).start()

    def next_event() -> NodeEvent:
        event = watch.get(WAIT_SECONDS)
        assert event is not None
        return event

    try:
        args = ("--lease-only", "--ttl-seconds", str(ttl_seconds))
        killed, stopped = agents.start("killed", *args), agents.start("stopped", *args)
        joined = {next_event().node_id, next_event().node_id}
        assert joined == {"killed", "stopped"}

        killed.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        event = next_event()
        kill_latency = time.monotonic() - killed_at
        assert (event.kind, event.node_id) == ("left", "killed")
        assert kill_latency <= ttl_seconds + 2.0

        stopped.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        event = next_event()
        stop_latency = time.monotonic() - stopped_at
        assert (event.kind, event.node_id) == ("left", "stopped")
        assert stop_latency <= 1.0
        assert stopped.wait(timeout=10) == 0
        print(f"departure after SIGKILL {kill_latency:.2f} s, after SIGTERM {stop_latency:.2f} s")
    finally:
        watch.close()
        client.close()
        agents.stop_all()
