"""Losing one of four nodes with a global batch that does not divide by three (issue 16).

Four real `elasticd run` daemons (one gloo worker each, a real etcd) train 20 samples per step;
one node is SIGKILLed after a checkpoint of the 4-node round; the survivors resume at world
size 3 (slices of 7, 7 and 6 samples). Compared with an uninterrupted 4-rank run: the same
samples over the run, and the first resumed loss within 1e-4 relative.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemons import daemons, merged_steps, start_daemon, tiny_job, wait_world_size
from tests.support.etcd import EtcdServer, etcd_server
from tests.support.procs import events, running, step_losses, wait_for, write_config

__all__ = ["etcd_server"]  # the fixture, used by name

pytestmark = pytest.mark.slow

SAMPLES = 20  # 5 per rank at 4 nodes; 7, 7, 6 at 3
SEQ_LEN = 32
STEPS = 120


def uneven_job(tmp: Path, demo: Path, *, endpoint: str) -> dict[str, Any]:
    return tiny_job(
        tmp,
        demo,
        endpoint=endpoint,
        run_id="uneven",
        nodes={"min": 3, "max": 4},
        train={"steps": STEPS, "global_batch_tokens": SAMPLES * SEQ_LEN},
    )


def final_lines(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The step line that counts for each step: the last one (steps after the newest
    checkpoint were trained again after the loss)."""
    return {int(r["step"]): r for r in rows}


def test_losing_one_of_four_nodes_resumes_at_three_with_the_same_samples_and_loss(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    doc = uneven_job(tmp_path / "elastic", demo_corpus, endpoint=etcd_server.endpoint)
    with daemons() as group:
        group += [
            start_daemon(doc, name=n, log_dir=tmp_path / "elastic") for n in ("a", "b", "c", "d")
        ]
        wait_world_size(group, 4, timeout_seconds=240)
        wait_for(
            lambda: [
                r for d in group for r in d.events("checkpoint_commit") if r["world_size"] == 4
            ],
            timeout_seconds=120,
            what="a checkpoint at world size 4",
        )
        killed_at = time.time()
        victim = next(d for d in group if not d.steps())  # a node not hosting rank 0
        victim.kill_with_workers()
        survivors = [d for d in group if d is not victim]
        first = wait_world_size(survivors, 3, timeout_seconds=120, after_ts=killed_at)
        for d in survivors:
            assert d.wait(timeout_seconds=300) == 0, d.log.read_text()[-3000:]
    loads = [
        r
        for d in survivors
        for r in d.events("checkpoint_load")
        if r["ts"] > killed_at and r["world_size_now"] == 3
    ]
    assert loads and loads[0]["world_size_saved"] == 4
    assert first["step"] == loads[0]["step"] + 1

    reference_dir = tmp_path / "uninterrupted"
    reference_doc = uneven_job(reference_dir, demo_corpus, endpoint=etcd_server.endpoint)
    reference_dir.mkdir()
    config = write_config(reference_dir / "job.yaml", reference_doc)
    with running(config, world_size=4, log_dir=reference_dir / "logs") as workers:
        assert workers.wait(timeout_seconds=300) == [0] * 4, workers.rank0_log.read_text()[-3000:]
    reference = final_lines(events(workers.rank0_log, "step"))
    reference_losses = step_losses(workers.rank0_log)

    trained = final_lines(merged_steps(*group))
    assert sorted(trained) == list(range(1, STEPS + 1))
    assert trained[STEPS]["world_size"] == 3
    consumed = Counter(i for r in trained.values() for i in r["sample_ids"])
    assert consumed == Counter(i for r in reference.values() for i in r["sample_ids"])
    assert sum(consumed.values()) == STEPS * SAMPLES
    expected = reference_losses[first["step"]]
    relative = abs(first["loss"] - expected) / abs(expected)
    print(f"first resumed step {first['step']}: loss {first['loss']!r} vs {expected!r}")
    print(f"relative difference {relative:.3g}")
    assert relative <= 1e-4
