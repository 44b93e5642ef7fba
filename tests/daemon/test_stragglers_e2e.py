"""Straggler detection end to end (issue 16): three real daemons, one rank made slow by the
``slow`` fault; only its node is flagged (event, metrics), it clears when the fault ends, and
with ``stragglers.drain`` it leaves while the other two train on."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemons import Daemon, daemons, merged_steps, start_daemon, tiny_job
from tests.support.etcd import EtcdServer
from tests.support.procs import wait_for

pytestmark = pytest.mark.slow

FAULTS_ENV = {"ELASTICD_ALLOW_FAULTS": "1"}
SLOW_STEP, SLOW_RANK, SLOW_MS = 15, 2, 300
STRAGGLERS = {"factor": 1.5, "window_seconds": 3.0, "sample_seconds": 2.0}


def job(tmp: Path, demo: Path, endpoint: str, *, run_id: str, **overrides: Any) -> dict[str, Any]:
    return tiny_job(
        tmp,
        demo,
        endpoint=endpoint,
        run_id=run_id,
        # A last call long enough for all three to be in the first round: rank 2 exists from
        # step 1 (the fault fires at its step, on global rank 2 only).
        nodes={"min": 2, "max": 3, "last_call_seconds": 10.0},
        **overrides,
    )


def straggler_events(d: Daemon, *, flagged: bool) -> list[dict[str, Any]]:
    return [r for r in d.events("straggler") if r["straggler"] is flagged]


def slow_node(group: list[Daemon]) -> Daemon:
    """The daemon whose worker fired the ``slow`` fault (it relays the worker's line)."""

    def fired() -> list[Daemon]:
        return [d for d in group if any(r["kind"] == "slow" for r in d.events("fault_injected"))]

    found = wait_for(fired, timeout_seconds=240, what="the slow fault firing")
    assert len(found) == 1
    return found[0]  # type: ignore[no-any-return]


def fault_start_ts(d: Daemon) -> float:
    return float(next(r["ts"] for r in d.events("fault_injected") if r["kind"] == "slow"))


def test_only_the_slow_node_is_flagged_after_the_window_and_cleared_when_it_recovers(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    slow_steps = 50  # ~15 s slow: time for the window and for reading the flagged series
    doc = job(
        tmp_path,
        demo_corpus,
        etcd_server.endpoint,
        run_id="straggler",
        # The run outlasts the scenario whatever the machine's speed (the flag clears a window
        # after the fault's last step): the test ends it with a drain once it has seen that.
        train={"steps": 5000},
        stragglers=STRAGGLERS,
        faults=[
            {
                "kind": "slow",
                "step": SLOW_STEP,
                "rank": SLOW_RANK,
                "ms": SLOW_MS,
                "steps": slow_steps,
            }
        ],
    )
    with daemons() as group:
        group += [
            start_daemon(doc, name=n, log_dir=tmp_path, env=FAULTS_ENV) for n in ("a", "b", "c")
        ]
        slow = slow_node(group)
        others = [d for d in group if d is not slow]
        flagged = wait_for(
            lambda: straggler_events(slow, flagged=True),
            timeout_seconds=60,
            what="the straggler event of the slow node",
        )[0]
        # While flagged (the fault lasts ~50 x 0.3 s): the node's own series say so.
        assert slow.metric("elasticd_node_straggler") == 1.0
        assert (slow.metric("elasticd_node_straggler_ratio") or 0.0) >= STRAGGLERS["factor"]
        assert slow.metric("elasticd_node_straggler_events_total") == 1.0
        for d in others:
            assert d.metric("elasticd_node_straggler") == 0.0
            assert 0.0 < (d.metric("elasticd_node_straggler_ratio") or 0.0) < 1.5
            assert (d.metric("elasticd_node_step_compute_seconds") or 0.0) > 0.0
        cleared = wait_for(
            lambda: straggler_events(slow, flagged=False),
            timeout_seconds=120,
            what="the straggler flag clearing after the fault's last step",
        )[0]
        steps_before_drain = merged_steps(*group)
        for d in group:
            d.signal(signal.SIGTERM)
        assert [d.wait(timeout_seconds=120) for d in group] == [0, 0, 0]
    delay = flagged["ts"] - fault_start_ts(slow)
    fault_end_ts = next(
        r["ts"] for r in merged_steps(*group) if r["step"] == SLOW_STEP + slow_steps
    )
    # No sooner than the window (the samples must first show the slowness); how much later is
    # measured (bench-like figures in the closing notes), not asserted: CI load moves it.
    assert STRAGGLERS["window_seconds"] <= delay, delay
    assert flagged["ratio"] >= STRAGGLERS["factor"] and flagged["nodes"] == 3
    assert flagged["reference_seconds"] > 0 and flagged["drain"] is False
    assert cleared["ts"] > fault_end_ts - 1.0
    assert all(not d.events("straggler") for d in others)
    assert {r["world_size"] for r in steps_before_drain} == {3}
    print(
        f"straggler detection delay (fault start -> event): {delay:.2f} s; "
        f"cleared {cleared['ts'] - fault_end_ts:.2f} s after the fault's last step; "
        f"ratio {flagged['ratio']}, robust z {flagged['robust_z']}"
    )


def test_a_straggler_with_drain_leaves_and_the_other_two_train_on(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    total_steps = 80
    doc = job(
        tmp_path,
        demo_corpus,
        etcd_server.endpoint,
        run_id="straggler-drain",
        train={"steps": total_steps},
        stragglers={**STRAGGLERS, "drain": True},
        faults=[{"kind": "slow", "step": SLOW_STEP, "rank": SLOW_RANK, "ms": SLOW_MS}],
    )
    with daemons() as group:
        group += [
            start_daemon(doc, name=n, log_dir=tmp_path, env=FAULTS_ENV) for n in ("a", "b", "c")
        ]
        slow = slow_node(group)
        assert slow.wait(timeout_seconds=120) == 0
        stayers = [d for d in group if d is not slow]
        for d in stayers:
            assert d.wait(timeout_seconds=300) == 0
    flagged = straggler_events(slow, flagged=True)
    assert len(flagged) == 1 and flagged[0]["drain"] is True
    draining = [r for r in slow.events("state") if r["state"] == "draining"]
    assert [r["reason"] for r in draining] == ["straggler"]
    assert slow.states()[-2:] == ["draining", "stopped"]
    rows = merged_steps(*group)
    assert [int(r["step"]) for r in rows] == list(range(1, total_steps + 1))  # no step lost
    assert rows[-1]["world_size"] == 2
    after = [r for r in rows if r["ts"] > flagged[0]["ts"] and r["world_size"] == 2]
    assert after, "the other two nodes trained on after the straggler left"
    assert all(not d.events("straggler") for d in stayers)
    print(
        f"straggler drained: detected {flagged[0]['ts'] - fault_start_ts(slow):.2f} s after "
        f"the fault started; the two stayers trained {len(after)} steps after it left"
    )
