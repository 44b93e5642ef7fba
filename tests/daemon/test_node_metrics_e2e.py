"""Metrics correct on every node (issue 16): a 3-node run, all three /metrics scraped.

Each node exports what it knows of its own ranks (step, step time, its share of the
throughput, heartbeat age, restarts); the run-level series (loss, grad norm, lr, guard state,
last committed step) come only from the node that hosts global rank 0 and are absent elsewhere.
After a regroup that moves rank 0 to another node, the new host exports them and the remaining
other node still does not.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest

from tests.support.daemons import Daemon, daemons, start_daemon, tiny_job, wait_step
from tests.support.etcd import EtcdServer
from tests.support.procs import wait_for

pytestmark = pytest.mark.slow

RUN_LEVEL = (
    "elasticd_train_loss",
    "elasticd_train_grad_norm",
    "elasticd_train_learning_rate",
    "elasticd_checkpoint_last_committed_step",
)


def rank0_host(group: list[Daemon], *, after_ts: float = 0.0) -> Daemon:
    """The node whose log carries global rank 0's step lines (newer than ``after_ts``)."""
    hosts = [d for d in group if any(r["ts"] > after_ts for r in d.events("step"))]
    assert len(hosts) == 1, [d.name for d in hosts]
    return hosts[0]


def assert_node_series(d: Daemon) -> None:
    """What every node knows of its own ranks."""
    assert (d.metric("elasticd_train_step") or 0) > 0, d.name
    assert (d.metric("elasticd_node_step_seconds") or 0) > 0, d.name
    # One of three nodes: a third of the group's tokens per step (24 x 32 here).
    tokens = d.metric("elasticd_node_tokens_per_second") or 0
    assert tokens > 0, d.name
    assert tokens * (d.metric("elasticd_node_step_seconds") or 0) == pytest.approx(
        24 * 32 / d_world(d), rel=0.01
    )
    age = d.metric("elasticd_worker_heartbeat_age_seconds")
    assert age is not None and 0 <= age < 30, (d.name, age)
    assert d.metric("elasticd_worker_restarts_total", reason="crash") == 0


def d_world(d: Daemon) -> float:
    return float(d.metric("elasticd_group_world_size") or 1)


def test_each_node_exports_its_own_series_and_only_rank_0s_host_the_run_level_ones(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    doc = tiny_job(
        tmp_path,
        demo_corpus,
        endpoint=etcd_server.endpoint,
        run_id="permetrics",
        nodes={"min": 2, "max": 3},
        train={"steps": 2000},
    )
    with daemons() as group:
        group += [start_daemon(doc, name=n, log_dir=tmp_path) for n in ("a", "b", "c")]
        wait_for(
            lambda: (
                all(d.metric("elasticd_group_world_size") == 3 for d in group)
                and all((d.metric("elasticd_node_step_seconds") or 0) > 0 for d in group)
            ),
            timeout_seconds=240,
            what="three nodes training, each with a step time",
        )
        wait_step(group, 12, timeout_seconds=120)  # a checkpoint committed (interval 10)
        host = rank0_host(group)
        others = [d for d in group if d is not host]
        for d in group:
            assert_node_series(d)
        loss = host.metric("elasticd_train_loss")
        assert loss is not None and math.isfinite(loss) and loss > 0
        assert host.metric("elasticd_guard_state", state="ok") == 1
        assert (host.metric("elasticd_checkpoint_last_committed_step") or 0) >= 10
        for d in others:
            for name in RUN_LEVEL:
                assert d.metric(name) is None, (d.name, name)
            assert d.metric("elasticd_guard_state", state="ok") is None, d.name

        # The host leaves: rank 0 moves to one of the others.
        moved_at = max(r["ts"] for r in host.events("step"))
        host.signal(signal.SIGTERM)
        assert host.wait(timeout_seconds=120) == 0
        survivors = others
        wait_for(
            lambda: (
                any(r["ts"] > moved_at for d in survivors for r in d.events("step"))
                and all(d.metric("elasticd_group_world_size") == 2 for d in survivors)
            ),
            timeout_seconds=180,
            what="the two survivors training with rank 0 on one of them",
        )
        new_host = rank0_host(survivors, after_ts=moved_at)
        other = next(d for d in survivors if d is not new_host)
        wait_for(
            lambda: new_host.metric("elasticd_train_loss") is not None,
            timeout_seconds=60,
            what="the run's loss on the new rank-0 host",
        )
        assert new_host.metric("elasticd_guard_state", state="ok") == 1
        for name in RUN_LEVEL:
            assert other.metric(name) is None, (other.name, name)
        wait_for(
            lambda: (
                (other.metric("elasticd_node_step_seconds") or 0) > 0
                and (other.metric("elasticd_train_step") or 0) > 12
            ),
            timeout_seconds=60,
            what="the non-host survivor's own series moving on",
        )
