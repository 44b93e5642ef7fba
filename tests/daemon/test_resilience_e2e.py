"""Hangs, etcd outages, crash loops and a run with many faults (issue 4)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from elastic.rendezvous import EtcdConfig, RunStore, connect
from tests.support.daemons import daemons, merged_steps, start_daemon, tiny_job, wait_step
from tests.support.etcd import EtcdServer
from tests.support.procs import wait_for

pytestmark = pytest.mark.slow
FAULTS_ENV = {"ELASTICD_ALLOW_FAULTS": "1"}


def test_a_stopped_worker_is_detected_as_a_hang_and_recovered(
    tmp_path: Path, demo_corpus: Path
) -> None:
    timeout = 10
    doc = tiny_job(
        tmp_path,
        demo_corpus,
        endpoint=None,
        nodes={"min": 1, "max": 1},
        nproc_per_node=2,
        watchdog={"timeout_seconds": timeout},
        # No periodic save: a worker stopped inside one is judged by the startup timeout.
        checkpoint={"interval_steps": 1000},
        train={"steps": 40},
    )
    with daemons() as group:
        node = start_daemon(doc, name="solo", log_dir=tmp_path)
        group.append(node)
        wait_step(group, 12, timeout_seconds=240)
        stopped_at = time.time()
        os.kill(node.worker_pids()[1], signal.SIGSTOP)
        restart = wait_for(
            lambda: node.events("restart"), timeout_seconds=timeout + 30, what="a restart"
        )[0]
        assert restart["reason"] == "hang"
        assert restart["ts"] - stopped_at <= timeout + 5
        assert node.wait(timeout_seconds=240) == 0
    assert max(node.steps()) == 40


def test_an_etcd_outage_does_not_stop_training(
    tmp_path: Path, demo_corpus: Path, etcd_factory: object
) -> None:
    etcd: EtcdServer = etcd_factory()  # type: ignore[operator]
    ttl_seconds = 10
    doc = tiny_job(
        tmp_path,
        demo_corpus,
        endpoint=etcd.endpoint,
        run_id="outage",
        nodes={"min": 2, "max": 2},
        etcd={"ttl_seconds": ttl_seconds},
        train={"steps": 100000},
    )
    with daemons() as group:
        group += [start_daemon(doc, name=n, log_dir=tmp_path) for n in ("a", "b")]
        wait_step(group, 10, timeout_seconds=240)
        etcd.kill()
        down_at = time.time()
        time.sleep(15)  # the outage itself is the scenario: 15 s without etcd
        during = [r for r in merged_steps(*group) if r["ts"] > down_at + 1]
        etcd.restart()
        back_at = time.time()
        wait_for(
            lambda: [r for d in group for r in d.events("etcd_up") if r["ts"] > back_at],
            timeout_seconds=30,
            what="daemons reconnecting",
        )
        # Steps past one lease TTL after etcd is back: a lease lost to the outage would have
        # expired by then and forced a new round.
        wait_for(
            lambda: [r for r in merged_steps(*group) if r["ts"] > back_at + ttl_seconds + 2],
            timeout_seconds=60,
            what="steps a lease TTL after the outage",
        )
        # Read before the teardown: killing one daemon breaks the other's collectives, and
        # that restart belongs to the teardown, not to the outage.
        restarts = [r for d in group for r in d.events("restart")]
    assert len(during) >= 10, "steps must keep completing while etcd is down"
    assert not restarts, f"the outage caused restarts: {restarts}"


def test_a_crash_loop_stops_at_the_budget_marks_the_run_failed_and_keeps_healthz(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    doc = tiny_job(
        tmp_path,
        demo_corpus,
        endpoint=etcd_server.endpoint,
        run_id="loop",
        nodes={"min": 1, "max": 1},
        watchdog={"max_restarts": 2, "restart_window_seconds": 600},
        faults=[{"kind": "crash_on_start", "times": 0}],
    )
    with daemons() as group:
        node = start_daemon(doc, name="solo", log_dir=tmp_path, env=FAULTS_ENV)
        group.append(node)
        wait_for(lambda: "failed" in node.states(), timeout_seconds=300, what="state failed")
        store = RunStore(connect(EtcdConfig(endpoints=(etcd_server.endpoint,))), run_id="loop")
        # The state line is logged before the status reaches etcd: wait for it, bounded.
        wait_for(
            lambda: (store.get_status() or {}).get("state") == "failed",
            timeout_seconds=30,
            what="run status failed in etcd",
        )
        code, body = node.get("/healthz")
        assert code == 200 and body["state"] == "failed" and "crash loop" in body["detail"]
        assert len(node.events("restart")) == 2
        assert node.proc.poll() is None  # still up, serving /healthz
        # What `elasticctl status` shows of it: the failed worker's command and exit code.
        failure = wait_for(
            lambda: _member(store, "solo").get("last_failure"),
            timeout_seconds=30,
            what="the failed worker in the node's status",
        )
        assert failure["returncode"] > 0 and failure["local_rank"] == 0  # exited, not killed
        assert failure["command"][1:4] == ["-P", "-m", "model.train"]
        assert isinstance(failure["output_tail"], list)


def _member(store: RunStore, node: str) -> dict[str, Any]:
    member = store.members().get(node)
    return member if isinstance(member, dict) else {}


FIVE_FAULTS = [
    {"kind": "kill", "step": 40, "rank": 1},
    {"kind": "hang", "step": 90, "rank": 0},
    {"kind": "nan", "step": 150},
    {"kind": "poison_batch", "step": 200, "mode": "random"},
    {"kind": "lr_spike", "step": 240, "factor": 3.0, "duration_steps": 5},
]


def final_loss(group: list) -> float:  # type: ignore[type-arg]
    done = [r for d in group for r in d.events("done")]
    assert done, "the run did not finish"
    return float(done[0]["final_loss"])


def test_a_two_node_run_with_five_faults_ends_within_1pct_of_a_clean_run(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    results = {}
    for label, faults in (("clean", []), ("faulty", FIVE_FAULTS)):
        doc = tiny_job(
            tmp_path / label,
            demo_corpus,
            endpoint=etcd_server.endpoint,
            run_id=f"five-{label}",
            nodes={"min": 2, "max": 2},
            watchdog={"timeout_seconds": 15},
            train={"steps": 300},
            checkpoint={"interval_steps": 25, "keep_last": 8},
            rewind={"min_steps_back": 25, "good_after_steps": 10},
            faults=faults,
        )
        with daemons() as group:
            group += [
                start_daemon(doc, name=n, log_dir=tmp_path / label, env=FAULTS_ENV)
                for n in ("a", "b")
            ]
            for d in group:
                assert d.wait(timeout_seconds=600) == 0
        results[label] = (final_loss(group), group)
    clean, faulty = results["clean"][0], results["faulty"][0]
    group = results["faulty"][1]
    reasons = sorted(r["reason"] for d in group for r in d.events("restart"))
    assert "crash" in reasons and "hang" in reasons
    kinds = {r["kind"] for d in group for r in d.events("fault_injected")}
    assert {"lr_spike"} <= kinds
    assert max(merged_steps(*group), key=lambda r: r["step"])["step"] == 300
    assert abs(faulty - clean) / clean <= 0.01, (faulty, clean)
