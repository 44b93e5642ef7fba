"""A training loop under the worker API in this process (world size 1, gloo), end to end:
steps, checkpoints at the interval, resume, faults, the daemon's requests, exit codes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml

import elastic.worker
from elastic.channel import DaemonChannel
from elastic.checkpoint import CheckpointConfig
from elastic.faults import FaultConfig
from elastic.guard import Action
from elastic.protocol import Env, ExitCode, Phase
from elastic.worker import Run, RunConfig, StepVerdict
from tests.support.syncs import HostSyncCounter

Lines = Callable[[], list[dict[str, Any]]]
INTERVAL = 4


def run_config(tmp_path: Path, *, interval_steps: int = INTERVAL, **overrides: Any) -> RunConfig:
    checkpoint = CheckpointConfig(url=str(tmp_path / "ckpt"), interval_steps=interval_steps)
    return RunConfig(
        run_id="unit", run_dir=str(tmp_path / "run"), checkpoint=checkpoint, **overrides
    )


class Loop:
    """A user's loop: a tiny regression, its batch a pure function of the step."""

    def __init__(self, run: Run, *, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.run = run
        self.model = torch.nn.Linear(4, 1)
        self.optim = torch.optim.SGD(self.model.parameters(), lr=0.05)
        run.track(model=self.model, optim=self.optim)
        self.verdicts: dict[int, StepVerdict] = {}

    def step(self, step: int) -> StepVerdict:
        gen = torch.Generator().manual_seed(step)
        inputs = torch.randn(8, 4, generator=gen)
        loss = (self.model(inputs) - inputs.sum(dim=1, keepdim=True)).square().mean()
        self.optim.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        verdict = self.run.report(loss=loss, grad_norm=grad_norm, tokens=8, lr=0.05)
        if verdict.apply:
            self.optim.step()
        self.verdicts[step] = verdict
        return verdict

    def train(self, total: int, *, before: Callable[[int], None] = lambda step: None) -> int:
        for step in self.run.steps(total):
            before(step)
            self.step(step)
        return self.run.finish()

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def start(config: RunConfig | str, environ: dict[str, str] | None = None) -> Run:
    return elastic.worker.init(config, device="cpu", environ=environ or {})


def leave() -> None:
    dist.destroy_process_group()


def events(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("event") == name]


def test_a_loop_runs_to_the_end_with_checkpoints_at_the_interval(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    run = start(run_config(tmp_path))
    loop = Loop(run)
    assert loop.train(12) == ExitCode.OK
    assert [m.step for m in run.ckpt.list()] == [4, 8, 12]
    assert sorted(run.recovery.committed) == [4, 8, 12]
    lines = log_lines()
    assert [line["step"] for line in events(lines, "step")] == list(range(1, 13))
    assert events(lines, "start")[0].get("resumed_from") is None
    assert events(lines, "done")[0]["final_loss"] == pytest.approx(loop.verdicts[12].loss)
    assert all(v.apply and v.action is Action.OK for v in loop.verdicts.values())
    step_line = events(lines, "step")[0]
    assert step_line["lr"] == 0.05
    assert step_line["world_size"] == 1
    assert step_line["tokens_per_s"] > 0
    assert (step_line["tokens"], step_line["total_steps"]) == (8, 12)
    assert "flops" not in step_line and "mfu" not in step_line  # no flops_per_token given


def test_a_second_run_resumes_after_the_last_checkpoint(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    first = Loop(start(run_config(tmp_path)))
    first.train(12)
    trained = first.weights()
    leave()

    second = Loop(start(run_config(tmp_path)), seed=1)  # other initial weights
    seen: dict[int, list[torch.Tensor]] = {}
    code = second.train(16, before=lambda step: seen.setdefault(step, second.weights()))
    assert code == ExitCode.OK
    assert list(seen) == [13, 14, 15, 16]
    assert all(torch.equal(a, b) for a, b in zip(seen[13], trained, strict=True))
    assert events(log_lines(), "start")[-1]["resumed_from"] == 12
    assert [m.step for m in second.run.ckpt.list()] == [4, 8, 12, 16]


def test_a_finished_run_trains_nothing_more(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    Loop(start(run_config(tmp_path))).train(8)
    leave()
    again = Loop(start(run_config(tmp_path)))
    assert again.train(8) == ExitCode.OK
    assert again.verdicts == {}


def test_init_uses_a_process_group_the_loop_formed_itself(
    tmp_path: Path, gloo: None, log_lines: Lines
) -> None:
    group = dist.group.WORLD
    run = start(run_config(tmp_path))
    assert dist.group.WORLD is group
    assert (run.info.rank, run.info.world_size, run.info.backend) == (0, 1, "gloo")
    assert Loop(run).train(2) == ExitCode.OK


def test_report_makes_one_host_sync_with_tensor_loss_and_grad_norm(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    run = start(run_config(tmp_path))
    loop = Loop(run)
    counted: list[HostSyncCounter] = []
    original = run.report

    def counting_report(**kwargs: Any) -> StepVerdict:
        with HostSyncCounter() as syncs:
            verdict = original(**kwargs)
        counted.append(syncs)
        return verdict

    run.report = counting_report  # type: ignore[method-assign]
    loop.train(5)
    assert [syncs.total for syncs in counted] == [1] * 5
    assert all(syncs.calls == {"tolist": 1} for syncs in counted)


def test_report_outside_a_step_raises(tmp_path: Path, no_group: None, log_lines: Lines) -> None:
    run = start(run_config(tmp_path))
    with pytest.raises(RuntimeError, match="report"):
        run.report(loss=1.0)


def test_a_nan_fault_makes_report_skip_that_step(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    run = start(run_config(tmp_path, faults=(FaultConfig(kind="nan", step=3),)))
    loop = Loop(run)
    assert loop.train(6) == ExitCode.OK
    skipped = {step for step, verdict in loop.verdicts.items() if not verdict.apply}
    assert skipped == {3}
    assert loop.verdicts[3].action is Action.SKIP_STEP
    lines = log_lines()
    assert [(e["kind"], e["step"]) for e in events(lines, "fault_injected")] == [("nan", 3)]
    assert [e["step"] for e in events(lines, "divergence")] == [3]
    assert [line["skipped"] for line in events(lines, "step")] == [
        False,
        False,
        True,
        False,
        False,
        False,
    ]


def test_faults_in_a_config_file_need_permission_in_the_environment(
    tmp_path: Path, no_group: None, log_lines: Lines, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    document = {
        "run_id": "unit",
        "checkpoint": {"url": str(tmp_path / "ckpt"), "interval_steps": INTERVAL},
        "faults": [{"kind": "nan", "step": 2}],
    }
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(SystemExit) as refused:
        start(str(path))
    assert refused.value.code == ExitCode.CONFIG
    assert "faults" in capsys.readouterr().err
    assert not dist.is_initialized()

    loop = Loop(start(str(path), environ={Env.ALLOW_FAULTS: "1"}))
    loop.train(3)
    assert [step for step, v in loop.verdicts.items() if not v.apply] == [2]


def test_the_daemon_sees_heartbeats_and_a_drain_commits_and_exits_drained(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    daemon = DaemonChannel(tmp_path / "round")
    run = start(run_config(tmp_path), environ={Env.WORKER_DIR: str(daemon.directory)})
    assert run.channel.attached

    def drain_at_6(step: int) -> None:
        if step == 6:
            daemon.send("drain")

    loop = Loop(run)
    assert loop.train(12, before=drain_at_6) == ExitCode.DRAINED
    assert list(loop.verdicts) == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in run.ckpt.list()] == [4, 6]
    beat = daemon.heartbeats()[0]
    assert (beat.step, beat.phase) == (6, Phase.TRAIN)
    assert beat.peak_memory_bytes is not None and beat.peak_memory_bytes > 1 << 20  # peak RSS
    assert events(log_lines(), "drain")


def test_an_operator_rewind_replays_from_the_committed_step(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    daemon = DaemonChannel(tmp_path / "round")
    run = start(run_config(tmp_path), environ={Env.WORKER_DIR: str(daemon.directory)})
    order: list[int] = []

    def rewind_at_6(step: int) -> None:
        order.append(step)
        if step == 6 and order.count(6) == 1:
            daemon.send("rewind", to_step=4)

    assert Loop(run).train(8, before=rewind_at_6) == ExitCode.OK
    assert order == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    assert run.recovery.ledger.data_entries == [
        {"kind": "reshuffle", "start_step": 5, "end_step": 7, "salt": 1}
    ]
    rewinds = events(log_lines(), "rewind")
    assert [(e["to_step"], e["trigger_step"]) for e in rewinds] == [(4, 6)]


def test_a_rewind_to_a_step_never_committed_is_refused(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    daemon = DaemonChannel(tmp_path / "round")
    run = start(run_config(tmp_path), environ={Env.WORKER_DIR: str(daemon.directory)})

    def rewind_at_6(step: int) -> None:
        if step == 6:
            daemon.send("rewind", to_step=5)

    loop = Loop(run)
    assert loop.train(8, before=rewind_at_6) == ExitCode.OK
    assert list(loop.verdicts) == list(range(1, 9))
    assert [e["to_step"] for e in events(log_lines(), "rewind_refused")] == [5]


def test_the_sampler_follows_the_run_ledger_after_a_rewind(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    daemon = DaemonChannel(tmp_path / "round")
    run = start(run_config(tmp_path), environ={Env.WORKER_DIR: str(daemon.directory)})
    sampler = run.sampler(64, global_batch_size=8)
    batches: list[tuple[int, list[int]]] = []

    def record_and_rewind(step: int) -> None:
        batches.append((step, sampler.local_indices(step)))
        if step == 6 and len(batches) == 6:
            daemon.send("rewind", to_step=4)

    Loop(run).train(7, before=record_and_rewind)
    first, replay = dict(batches[:6]), dict(batches[6:])
    assert list(replay) == [5, 6, 7]
    assert replay[5] != first[5] and replay[6] != first[6]  # the window was reshuffled


def test_steps_without_a_report_do_not_feed_the_guard(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    run = start(run_config(tmp_path, interval_steps=1000))
    for step in run.steps(100):
        if step % 10 == 0:  # e.g. a loop that reports only when it logs
            run.report(loss=2.0, grad_norm=1.0)
    assert run.finish() == ExitCode.OK
    assert events(log_lines(), "divergence") == []


def test_a_second_report_in_one_step_is_refused(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    run = start(run_config(tmp_path, interval_steps=1000))
    for _step in run.steps(1):
        run.report(loss=2.0, grad_norm=1.0)
        with pytest.raises(RuntimeError, match="twice"):
            run.report(loss=2.0, grad_norm=1.0)
    assert run.finish() == ExitCode.OK


def test_time_in_a_phase_is_not_counted_in_the_step_line(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    run = start(run_config(tmp_path, interval_steps=1000))
    for _step in run.steps(1):
        run.report(loss=2.0, grad_norm=1.0)
        with run.phase(Phase.EVAL):
            time.sleep(0.2)  # the eval's duration, which must not count as training
    assert run.finish() == ExitCode.OK
    (line,) = events(log_lines(), "step")
    assert line["step_seconds"] < 0.2


def test_flops_per_token_gives_the_step_flops_and_mfu_against_the_devices_peak(
    tmp_path: Path, no_group: None, log_lines: Lines
) -> None:
    run = start(run_config(tmp_path))
    assert run.peak_flops_per_device is None  # a CPU has no known peak
    model = torch.nn.Linear(4, 1)
    run.track(model=model)
    for step in run.steps(2):
        if step == 2:
            run.peak_flops_per_device = 1e9  # what a loop on an unlisted device sets
        loss = model(torch.ones(8, 4)).square().mean()
        run.report(loss=loss, tokens=8, flops_per_token=1000.0)
    assert run.finish() == ExitCode.OK
    first, second = events(log_lines(), "step")
    assert (first["flops"], second["flops"]) == (8000.0, 8000.0)
    assert "mfu" not in first
    # MFU: the step's FLOPs over its time, over the group's peak (one device here); the line
    # rounds step_seconds to 5 decimals and mfu to 5, hence bounds rather than one value.
    seconds = second["step_seconds"]
    low, high = (8000.0 / (seconds + d) / 1e9 for d in (5e-6, -5e-6))
    assert low - 5e-6 <= second["mfu"] <= high + 5e-6
