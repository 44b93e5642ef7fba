"""Goodput accounting of a real run with a kill, a rewind and a pause (issue 16 item 5)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.daemons import Daemon, daemons, start_daemon, tiny_job, wait_step
from tests.support.etcd import EtcdServer
from tests.support.procs import elasticctl, wait_for

pytestmark = pytest.mark.slow
FAULTS_ENV = {"ELASTICD_ALLOW_FAULTS": "1"}
PAUSE_SECONDS = 4.0
REWIND_TO = 50


def ctl(endpoint: str, run_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = elasticctl("--etcd", endpoint, "--run-id", run_id, *args)
    assert proc.returncode == 0, proc.stderr
    return proc


def badput(node: Daemon, kind: str) -> float:
    value = node.metric("elasticd_badput_seconds_total", kind=kind)
    assert value is not None, kind
    return value


def lost_step_seconds(node: Daemon) -> float:
    """Sum of ``step_seconds`` of the first line of every step that has more than one."""
    first: dict[int, float] = {}
    redone: set[int] = set()
    for row in node.events("step"):
        if row["step"] in first:
            redone.add(row["step"])
        first.setdefault(row["step"], row["step_seconds"])
    return sum(first[step] for step in redone)


def test_buckets_of_a_run_with_a_kill_a_rewind_and_a_pause_add_up_to_its_wall_time(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    ep, run = etcd_server.endpoint, "goodput"
    doc = tiny_job(
        tmp_path,
        demo_corpus,
        endpoint=ep,
        run_id=run,
        nodes={"min": 1, "max": 1},
        train={"steps": 200},  # room for elasticctl's latency before each request lands
        faults=[{"kind": "kill", "step": 40}],  # SIGKILL before step 40: resume from 30
    )
    with daemons() as group:
        spawned_unix = time.time()
        node = start_daemon(doc, name="solo", log_dir=tmp_path, env=FAULTS_ENV)
        group.append(node)

        wait_for(lambda: node.events("restart"), timeout_seconds=240, what="the kill's restart")
        after_kill = wait_for(
            lambda: badput(node, "recompute"), timeout_seconds=120, what="recompute after a kill"
        )

        wait_step(group, REWIND_TO + 30, timeout_seconds=240)
        ctl(ep, run, "rewind", "--to-step", str(REWIND_TO))
        wait_for(lambda: node.events("rewind"), timeout_seconds=60, what="the rewind")
        after_rewind = wait_for(
            lambda: (value := badput(node, "recompute")) > after_kill and value,
            timeout_seconds=120,
            what="recompute after the rewind",
        )

        ctl(ep, run, "pause")
        wait_for(lambda: node.events("paused"), timeout_seconds=60, what="paused")
        time.sleep(PAUSE_SECONDS)  # the pause itself is the scenario
        status = json.loads(ctl(ep, run, "status", "--json").stdout)
        assert status["goodput"]["badput_seconds"]["paused"] > 0
        assert status["members"]["solo"]["goodput"]["wall_seconds"] > 0
        assert "goodput" in ctl(ep, run, "status").stdout
        ctl(ep, run, "resume")
        wait_for(lambda: node.events("resumed"), timeout_seconds=60, what="resumed")

        assert node.wait(timeout_seconds=300) == 0

    stopped_unix = next(r["ts"] for r in node.events("state") if r["state"] == "stopped")
    final = node.events("goodput")[-1]
    buckets = final["badput_seconds"]
    print(f"goodput of the run: {json.dumps(final, sort_keys=True)}")
    total = final["productive_seconds"] + sum(buckets.values())
    wall_seconds = stopped_unix - spawned_unix  # measured outside the daemon
    assert abs(total - wall_seconds) <= 0.02 * wall_seconds, (total, wall_seconds)
    assert abs(total - final["wall_seconds"]) <= 0.01
    assert buckets["recompute"] >= round(after_rewind, 3) - 0.001  # the line rounds to ms
    assert after_rewind > after_kill > 0
    # Recompute is the first computation of every step that was done again (bounded by the
    # poll interval): compare with those steps' own timings from their first step lines.
    first_seconds = lost_step_seconds(node)
    assert 0.7 * first_seconds <= buckets["recompute"] <= 1.5 * first_seconds + 1.0, first_seconds
    held_seconds = node.events("resumed")[-1]["ts"] - node.events("paused")[-1]["ts"]
    assert abs(buckets["paused"] - held_seconds) <= 1.0, (buckets["paused"], held_seconds)
    # The workers' own load times (their `start` lines) are badput, in the load bucket or, for
    # a load shorter than the daemon's poll interval, in start-up (never productive).
    loads = sum(float(r.get("load_seconds") or 0.0) for r in node.events("start"))
    assert loads > 0
    assert buckets["checkpoint_load"] + buckets["startup"] >= loads
    assert buckets["startup"] > 0
    assert buckets["rendezvous"] > 0
    assert buckets["degraded"] == 0  # one node of nodes.max 1
    assert 0 < final["ratio"] < 1
