"""The supervisor's bookkeeping without processes: its status (with the failure report that
``elasticctl status`` shows) and how it reads a round's heartbeats."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from daemon.config import DaemonConfig
from daemon.lifecycle import State
from daemon.supervisor import Supervisor, _Progress
from daemon.workers import WorkerExit, failure_report
from elastic.protocol import ExitCode, Heartbeat, Phase


def supervisor() -> Supervisor:
    return Supervisor(DaemonConfig(), {}, node_id="node-a", environ={})


def test_a_node_without_failed_workers_has_no_last_failure() -> None:
    assert "last_failure" not in supervisor().status()


def test_a_failed_workers_command_exit_code_and_output_tail_go_into_the_node_status() -> None:
    sup = supervisor()
    tail = [f"line {i}" for i in range(30)]
    sup.last_failure = failure_report(
        command=["/usr/bin/python3", "train.py"],
        worker_exit=WorkerExit(local_rank=1, returncode=1),
        output_tail=tail,
    )
    assert sup.status()["last_failure"] == {
        "command": ["/usr/bin/python3", "train.py"],
        "local_rank": 1,
        "returncode": 1,
        "output_tail": tail[-20:],
    }


def beat(step: int, phase: Phase) -> Heartbeat:
    return Heartbeat(local_rank=0, step=step, phase=phase, time_unix=0.0, pid=1)


def test_the_newest_step_lines_loss_throughput_and_total_go_into_the_status() -> None:
    sup = supervisor()
    assert "train" not in sup.status()  # no step line yet: nothing is shown, nothing made up
    line = {"event": "step", "step": 12, "loss": 3.25, "tokens_per_s": 900.5, "lr": 0.1}
    sup._on_worker_line(0, {**line, "step_seconds": 0.5, "total_steps": 100, "grad_norm": 1.0})
    assert sup.status()["train"] == {
        "step": 12,
        "loss": 3.25,
        "tokens_per_s": 900.5,
        "step_seconds": 0.5,
        "total_steps": 100,
        "time_unix": sup.status()["train"]["time_unix"],
    }
    sup._on_worker_line(0, {**line, "step": 13, "loss": None, "tokens_per_s": None})
    assert set(sup.status()["train"]) == {"step", "time_unix"}  # a loop that reports neither
    assert sup.last_step == 13


def test_progress_without_heartbeats_counts_as_training_only_after_the_blind_period() -> None:
    progress = _Progress(100.0)
    progress.update({}, 150.0)
    assert not progress.heartbeats_seen
    assert not progress.training(150.0, blind_after_seconds=60.0)
    assert progress.training(161.0, blind_after_seconds=60.0)


def test_progress_with_heartbeats_trains_once_a_step_is_done_and_pauses_on_phase() -> None:
    progress = _Progress(100.0)
    progress.update({0: beat(0, Phase.START)}, 101.0)
    assert progress.heartbeats_seen and progress.slow_phase
    assert not progress.training(1000.0, blind_after_seconds=60.0)
    progress.update({0: beat(1, Phase.TRAIN)}, 102.0)
    assert progress.training(102.0, blind_after_seconds=60.0) and not progress.slow_phase
    progress.update({0: beat(1, Phase.PAUSED)}, 103.0)
    assert progress.paused and progress.last_change == 103.0


def test_progress_derives_the_nodes_step_time_and_throughput_share_from_beats() -> None:
    progress = _Progress(100.0, world_size=4)  # 2 nodes x 2 ranks
    assert progress.tokens_per_second(2) == 0.0  # nothing known yet

    def beat(rank: int, step: int, at: float) -> Heartbeat:
        return Heartbeat(rank, step, Phase.TRAIN, at, 1, step_tokens=4096.0)

    progress.update({0: beat(0, 10, 200.0), 1: beat(1, 10, 200.1)}, now=200.2)
    assert progress.step_seconds == 0.0  # one point is no rate
    progress.update({0: beat(0, 14, 202.1), 1: beat(1, 14, 202.0)}, now=202.2)
    assert progress.step_seconds == (202.1 - 200.1) / 4
    # Half the ranks of the world: half the group's 4,096 tokens per step.
    assert progress.tokens_per_second(2) == 2048.0 / progress.step_seconds
    beats = {0: beat(0, 14, 202.1), 1: beat(1, 14, 201.0)}
    assert _Progress.oldest_beat_age(beats, 203.0) == 2.0
    assert _Progress.oldest_beat_age({}, 203.0) == 0.0


def test_a_node_whose_id_was_taken_while_its_lease_expired_leaves_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sup = supervisor()
    lease = SimpleNamespace(taken=False)
    sup.group = SimpleNamespace(lease=lease, event=lambda record: None)  # type: ignore[assignment]
    sup.group.publish_node_status = lambda status: None  # type: ignore[attr-defined]
    sup.transition(State.JOINING)
    assert sup._identity_lost() is None
    lease.taken = True
    assert sup._identity_lost() == ExitCode.CONFIG
    assert sup.state is State.FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "elasticd: refused: node id 'node-a' was taken by another daemon while this node's "
        "lease had expired"
    ]
