"""Live scaling with no step lost: a node joins, a node drains on SIGTERM (issue 4)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from model.data_config import DataConfig
from model.mixture import build_sampler
from tests.support.daemons import (
    Daemon,
    daemons,
    merged_steps,
    start_daemon,
    tiny_job,
    wait_step,
    wait_world_size,
)
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.slow


STEPS_GROW = 500


def completed_once(rows: list[dict[str, Any]]) -> list[int]:
    """Step numbers in completion order (a repeat or a gap shows up here)."""
    return [int(r["step"]) for r in rows]


def reference_sample_ids(demo: Path, steps: range) -> dict[int, list[int]]:
    """The samples of each step as the pure sampler defines them (any world size)."""
    sampler = build_sampler(
        DataConfig(demo_dir=str(demo)), run_dir="unused", seq_len=32, global_batch_tokens=24 * 32
    )
    return {s: [x.sample_id for x in sampler.global_batch(s)] for s in steps}


def test_a_third_node_joins_at_a_step_boundary_without_a_gap_or_a_repeat(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    doc = tiny_job(
        tmp_path,
        demo_corpus,
        endpoint=etcd_server.endpoint,
        run_id="grow",
        nodes={"min": 2, "max": 3},
        # Long enough that c (started at step 15, seconds of start-up) joins before the end.
        train={"steps": STEPS_GROW},
    )
    with daemons() as group:
        group += [start_daemon(doc, name=n, log_dir=tmp_path) for n in ("a", "b")]
        wait_step(group, 15, timeout_seconds=240)
        group.append(start_daemon(doc, name="c", log_dir=tmp_path))
        wait_world_size(group, 3, timeout_seconds=180)
        for d in group:
            assert d.wait(timeout_seconds=300) == 0
    rows = merged_steps(*group)
    assert completed_once(rows) == list(range(1, STEPS_GROW + 1))
    sizes = [r["world_size"] for r in rows]
    assert sizes[0] == 2 and sizes[-1] == 3
    expected = reference_sample_ids(demo_corpus, range(1, STEPS_GROW + 1))
    assert {r["step"]: r["sample_ids"] for r in rows} == expected
    assert all(r["reason"] == "scale" for d in group for r in d.events("restart"))


def test_sigterm_drains_one_node_and_the_others_continue_without_losing_a_step(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    doc = tiny_job(
        tmp_path,
        demo_corpus,
        endpoint=etcd_server.endpoint,
        run_id="drain",
        nodes={"min": 1, "max": 3},
        train={"steps": 200},
    )
    with daemons() as group:
        group += [start_daemon(doc, name=n, log_dir=tmp_path) for n in ("a", "b", "c")]
        wait_world_size(group, 3, timeout_seconds=240)
        wait_step(group, 15, timeout_seconds=120)
        leaving: Daemon = next(d for d in group if not d.steps())
        sent = time.time()
        leaving.signal(signal.SIGTERM)
        assert leaving.wait(timeout_seconds=60) == 0
        drained_in = time.time() - sent
        stayers = [d for d in group if d is not leaving]
        for d in stayers:
            assert d.wait(timeout_seconds=300) == 0
    rows = merged_steps(*group)
    assert completed_once(rows) == list(range(1, 201))
    assert rows[-1]["world_size"] == 2
    commits = [r["step"] for d in group for r in d.events("checkpoint_commit")]
    drain_step = (
        max(r["step"] for r in leaving.events("drain")) if leaving.events("drain") else None
    )
    assert drain_step is None or drain_step in commits
    assert leaving.states()[-2:] == ["draining", "stopped"]
    assert drained_in < 60
    # The stayers' next round formed without waiting out the leaver's keep-alives (3 x 1 s)
    # and the last call (2 s): the leaver left the rendezvous, every expected node had joined.
    regrouped = [r for d in stayers for r in d.events("round") if r["ts"] > sent]
    assert regrouped and max(r["seconds"] for r in regrouped) < 4.0
    print(f"drain took {drained_in:.1f} s")
