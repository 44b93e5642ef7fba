"""Bring-your-own training loops under real `elasticd run` daemons (issue 15).

``examples/byo/plain.py`` (a DDP script that imports nothing of elasticd) and
``examples/byo/own_loop.py`` (a char-level transformer on the worker API), each started by the
daemon from its example config, with a real etcd (the embedded one, or a server shared by two
daemons), gloo workers on loopback; every wait is bounded. own_loop runs a small model here (a
step takes a few ms), so runs are long in steps and short in seconds.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemons import (
    Daemon,
    daemons,
    example_job,
    merged_steps,
    start_daemon,
    tiny_job,
    wait_step,
    wait_world_size,
)
from tests.support.etcd import EtcdServer
from tests.support.procs import REPO, base_env, elasticctl, events, wait_for, write_config

pytestmark = pytest.mark.slow

FAULTS_ENV = {"ELASTICD_ALLOW_FAULTS": "1"}

# A small own_loop model on one thread: a step takes a few ms on a loaded 2-core machine.
SMALL_TRAIN = {
    "d_model": 32,
    "n_layer": 1,
    "n_head": 2,
    "seq_len": 32,
    "global_batch_size": 8,
    "log_sample_ids": True,
}
# Checkpoints every 10 steps; rewinds may go back 10 steps, to a checkpoint 5 healthy steps old.
# With the default guard (onset lag <= 49 steps) retention needs (7 - 1) x 10 >= 10 + 49.
CHECKPOINTS = {"interval_steps": 10, "keep_last": 7}
REWIND = {"min_steps_back": 10, "good_after_steps": 5}


def own_loop_job(
    tmp: Path, *, steps: int, endpoint: str | None = None, run_id: str = "byo", **overrides: Any
) -> dict[str, Any]:
    """examples/byo/own_loop.yaml for a test: the small model, ``steps`` steps."""
    sections: dict[str, Any] = {
        "checkpoint": CHECKPOINTS,
        "rewind": REWIND,
        "train": {**SMALL_TRAIN, "steps": steps},
        **overrides,
    }
    return example_job("byo/own_loop.yaml", tmp, endpoint=endpoint, run_id=run_id, **sections)


def last_sample_ids(rows: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Step -> the sample ids of its last logged occurrence (``rows`` in log order): a step
    replayed after a restart or a rewind counts as it was finally trained."""
    return {int(r["step"]): r["sample_ids"] for r in rows}


def timelines(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Step lines split where the step number goes back (a restart or a rewind)."""
    out: list[list[dict[str, Any]]] = []
    for row in rows:
        if not out or row["step"] <= out[-1][-1]["step"]:
            out.append([])
        out[-1].append(row)
    return out


def before(rows: list[dict[str, Any]], event: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in rows if r["ts"] < event["ts"]]


def kill_worker_after_commit(node: Daemon, *, step: int) -> int:
    """SIGKILL local rank 1 once a checkpoint of ``step`` or later is committed; its pid."""
    wait_for(
        lambda: any(r["step"] >= step for r in node.events("checkpoint_commit")),
        timeout_seconds=120,
        what=f"a checkpoint at step >= {step}",
        interval=0.05,
    )
    victim = node.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    return victim


def test_plain_script_resumes_from_its_own_checkpoint_after_a_worker_is_sigkilled(
    tmp_path: Path,
) -> None:
    # plain.yaml as it is (3,000 steps of ~2 ms, a checkpoint every 100), but for the directory.
    steps, checkpoints = 3000, tmp_path / "plain-checkpoints"
    doc = example_job("byo/plain.yaml", tmp_path, endpoint=None, nodes={"min": 1, "max": 1})
    command = doc["worker"]["command"]
    assert command[command.index("--steps") + 1] == str(steps)
    command[command.index("--checkpoint-dir") + 1] = str(checkpoints)
    with daemons() as group:
        node = start_daemon(doc, name="plain", log_dir=tmp_path)
        group.append(node)
        kill_worker_after_commit(node, step=200)
        assert node.wait(timeout_seconds=120) == 0

    (restart,) = node.events("restart")
    assert restart["reason"] == "crash"
    newest = max(r["step"] for r in before(node.events("checkpoint_commit"), restart))
    # The script's own resume: from its newest checkpoint on disk at the kill.
    assert [r["resumed_from"] for r in node.events("start")] == [None, newest]
    resumed = [r for r in node.events("step") if r["ts"] > restart["ts"]]
    assert [r["step"] for r in resumed] == list(range(newest + 1, steps + 1))
    assert sorted(node.steps()) == list(range(1, steps + 1))
    assert (checkpoints / f"step-{steps}.pt").is_file()
    assert node.events("round_end")[-1]["decision"] == "done"  # every worker exited 0


def test_own_loop_resumes_after_a_kill_pauses_and_resumes_shows_its_loss_and_drains_on_sigterm(
    tmp_path: Path,
) -> None:
    doc = own_loop_job(tmp_path, steps=1_000_000, nodes={"min": 1, "max": 1})
    config = write_config(tmp_path / "own_loop.yaml", doc)
    with daemons() as group:
        node = start_daemon(config, name="solo", log_dir=tmp_path)
        group.append(node)

        # A worker SIGKILLed: the group restarts from the newest committed checkpoint.
        victim = kill_worker_after_commit(node, step=30)
        restart = wait_for(lambda: node.events("restart"), timeout_seconds=60, what="restart")[0]
        loaded = wait_for(
            lambda: node.events("checkpoint_load"), timeout_seconds=60, what="checkpoint_load"
        )[0]
        assert victim not in node.worker_pids()
        assert restart["reason"] == "crash"
        assert loaded["step"] == max(
            r["step"] for r in before(node.events("checkpoint_commit"), restart)
        )
        wait_step([node], loaded["step"] + 20, timeout_seconds=60)

        # Paused at a step boundary: the node's /metrics shows the last step line's loss.
        assert elasticctl("--config", str(config), "pause").returncode == 0
        paused = wait_for(lambda: node.events("paused"), timeout_seconds=30, what="paused")[0]
        held = node.events("step")[-1]
        assert held["step"] == paused["step"]
        assert node.metric("elasticd_train_loss") == held["loss"]
        assert elasticctl("--config", str(config), "resume").returncode == 0
        resumed = wait_for(lambda: node.events("resumed"), timeout_seconds=30, what="resumed")[0]
        wait_step([node], held["step"] + 20, timeout_seconds=60)

        # SIGTERM: drain, a checkpoint of the last completed step, exit 0.
        node.signal(signal.SIGTERM)
        assert node.wait(timeout_seconds=60) == 0

    rows = node.events("step")
    assert not [r for r in rows if paused["ts"] < r["ts"] < resumed["ts"]]
    after = [r for r in rows if r["ts"] > restart["ts"]]
    assert [r["step"] for r in after] == list(range(loaded["step"] + 1, after[-1]["step"] + 1))
    drain = node.events("drain")[-1]
    assert drain["step"] == after[-1]["step"]
    assert node.events("checkpoint_commit")[-1]["step"] == drain["step"]
    assert (tmp_path / "ckpt" / "byo" / f"step-{drain['step']}" / "manifest.json").is_file()
    assert node.states()[-2:] == ["draining", "stopped"]


RESHARD_STEPS = 1000


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """own_loop.py alone (one process, no daemon) for RESHARD_STEPS steps: its log."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp / "job.yaml", own_loop_job(tmp, steps=RESHARD_STEPS))
    log = tmp / "out.log"
    with open(log, "wb") as out:
        code = subprocess.run(
            [sys.executable, "examples/byo/own_loop.py", "--config", str(config)],
            cwd=REPO,
            env=base_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=240,
            check=False,
        ).returncode
    assert code == 0, log.read_text()[-3000:]
    return log


def test_plain_script_is_restarted_at_the_new_world_size_when_a_node_joins_and_stops_on_sigterm(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    # A script that cannot drain is stopped for the resize and resumes from its own checkpoint;
    # on SIGTERM its daemon stops it at once instead of waiting out drain.timeout_seconds.
    checkpoints = tmp_path / "plain-checkpoints"
    doc = example_job(
        "byo/plain.yaml",
        tmp_path,
        endpoint=etcd_server.endpoint,
        run_id="plain-resize",
        nproc_per_node=1,
        nodes={"min": 1, "max": 2},
        drain={"timeout_seconds": 600},
    )
    command = doc["worker"]["command"]
    command[command.index("--checkpoint-dir") + 1] = str(checkpoints)
    command[command.index("--steps") + 1] = "1000000"  # never finishes within the test
    with daemons() as group:
        group.append(start_daemon(doc, name="a", log_dir=tmp_path))
        wait_world_size(group, 1, timeout_seconds=120)
        joined_at = time.time()
        group.append(start_daemon(doc, name="b", log_dir=tmp_path))
        wait_world_size(group, 2, timeout_seconds=120, after_ts=joined_at)
        for node in group:
            node.signal(signal.SIGTERM)
        assert [d.wait(timeout_seconds=60) for d in group] == [0, 0]

    first = group[0]
    assert [r["reason"] for r in first.events("restart")] == ["scale"]
    resumed = [r["resumed_from"] for d in group for r in d.events("start")]
    assert any(step and step >= 100 for step in resumed)  # its own checkpoint, after the resize
    ends = [d.events("round_end")[-1] for d in group]
    assert [(e["decision"], "do not read drain" in e["detail"]) for e in ends] == [
        ("drained", True),
        ("drained", True),
    ]


def test_survivor_of_a_sigkilled_daemon_resumes_resharded_at_the_exact_data_position(
    tmp_path: Path, etcd_server: EtcdServer, reference_run: Path
) -> None:
    doc = own_loop_job(
        tmp_path,
        steps=RESHARD_STEPS,
        endpoint=etcd_server.endpoint,
        run_id="reshard",
        nproc_per_node=1,
        nodes={"min": 1, "max": 2},
    )
    with daemons() as group:
        group += [start_daemon(doc, name=n, log_dir=tmp_path) for n in ("a", "b")]
        wait_world_size(group, 2, timeout_seconds=120)
        wait_for(
            lambda: [
                r for d in group for r in d.events("checkpoint_commit") if r["world_size"] == 2
            ],
            timeout_seconds=60,
            what="a checkpoint at world size 2",
            interval=0.05,
        )
        killed_at = time.time()
        victim = next(d for d in group if not d.steps())  # the node without rank 0
        victim.kill_with_workers()
        survivor = next(d for d in group if d is not victim)
        assert survivor.wait(timeout_seconds=180) == 0

    rows = merged_steps(*group)
    assert rows[-1]["step"] == RESHARD_STEPS and rows[-1]["world_size"] == 1
    assert any(r["world_size"] == 2 and r["ts"] < killed_at for r in rows)
    loads = survivor.events("checkpoint_load")
    assert any(r["world_size_saved"] == 2 and r["world_size_now"] == 1 for r in loads)
    trained, reference = last_sample_ids(rows), last_sample_ids(events(reference_run, "step"))
    assert sorted(trained) == list(range(1, RESHARD_STEPS + 1))
    # The exact data position: the same samples at every step, hence the same multiset.
    assert trained == reference
    assert collections.Counter(i for ids in trained.values() for i in ids) == collections.Counter(
        i for ids in reference.values() for i in ids
    )


# The fault drills, with a guard of short windows (warm after 20 steps, escalation within 10;
# retention: (4 - 1) x 10 >= max(10, 5 + 1) + 9). A NaN at step 25 is skipped. The lr of steps
# 50..54 times 1000 blows the model up at once: loss ~3.5 -> ~15 at step 51, skipped, so are 52
# and 53, the third skip rewinds to checkpoint 40 (the same with seeds 0-2; at factor 100 the
# damage sometimes stayed under 6 sigma).
NAN_STEP, SPIKE_STEP = 25, 50
FAULTS = [
    {"kind": "nan", "step": NAN_STEP},
    {"kind": "lr_spike", "step": SPIKE_STEP, "factor": 1000.0, "duration_steps": 5},
]
FAST_GUARD = {
    "warmup_steps": 20,
    "skip_window_steps": 10,
    "nonfinite_window_steps": 10,
    "sustained_steps": 10,
}


def test_nan_step_is_skipped_and_lr_spike_rewinds_with_the_window_reshuffled(
    tmp_path: Path,
) -> None:
    doc = own_loop_job(
        tmp_path,
        steps=100,
        nodes={"min": 1, "max": 1},
        checkpoint={"interval_steps": 10, "keep_last": 4},
        guard=FAST_GUARD,
        faults=FAULTS,
    )
    with daemons() as group:
        node = start_daemon(doc, name="drills", log_dir=tmp_path, env=FAULTS_ENV)
        group.append(node)
        assert node.wait(timeout_seconds=120) == 0

    rows = node.events("step")
    first, replay = timelines(rows)
    flagged = {r["step"]: r for r in node.events("divergence")}
    # The NaN: that step skipped, training goes on.
    assert flagged[NAN_STEP]["kind"] == "nan" and flagged[NAN_STEP]["action"] == "skip_step"
    assert [r["skipped"] for r in first if NAN_STEP - 1 <= r["step"] <= NAN_STEP + 1] == [
        False,
        True,
        False,
    ]
    # The spike: a rewind with the window [to_step + 1, trigger] drawn again, other samples.
    (rewind,) = node.events("rewind")
    to_step, trigger = rewind["to_step"], rewind["trigger_step"]
    assert rewind["data_action"] == "reshuffle"
    assert to_step < SPIKE_STEP < rewind["onset_step"] <= trigger
    assert (first[-1]["step"], replay[0]["step"]) == (trigger, to_step + 1)
    original, redone = last_sample_ids(first), last_sample_ids(replay)
    assert all(redone[s] != original[s] for s in range(to_step + 1, trigger + 1))
    assert replay[-1]["step"] == 100
    assert node.events("done")[-1]["step"] == 100


@pytest.mark.parametrize("where", ["worker.cwd", "daemon cwd"])
def test_default_trainer_ignores_model_py_and_elastic_py_in_the_working_directory(
    tmp_path: Path, demo_corpus: Path, where: str
) -> None:
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    for name in ("model.py", "elastic.py"):
        (workdir / name).write_text(f'raise ImportError("{name} from the working directory")\n')
    doc = tiny_job(
        tmp_path, demo_corpus, endpoint=None, nodes={"min": 1, "max": 1}, train={"steps": 12}
    )
    assert "command" not in doc.get("worker", {})  # the default: the bundled trainer
    if where == "worker.cwd":
        doc["worker"] = {"cwd": str(workdir)}
    cwd = workdir if where == "daemon cwd" else REPO
    with daemons() as group:
        node = start_daemon(doc, name="isolated", log_dir=tmp_path, cwd=cwd)
        group.append(node)
        assert node.wait(timeout_seconds=180) == 0, node.log.read_text()[-3000:]

    assert sorted(node.steps()) == list(range(1, 13))
    assert node.events("done")[-1]["step"] == 12
    assert "from the working directory" not in node.log.read_text()
