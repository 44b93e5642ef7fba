"""End to end: the divergence guard in real gloo worker groups of `python -m model.train` (issue 5).

Two ranks on loopback, the tiny model, injected faults (``ELASTICD_ALLOW_FAULTS=1``):

- a NaN step (and a poisoned batch) is dropped and training goes on with finite weights;
- an ``lr_spike`` that blows up a post-LN model makes the run rewind >= 100 steps before the
  onset with the window reshuffled, and it still finishes within 2% of the run without the spike;
- that rewind is deterministic, also across a SIGKILL during the replay (the ledger survives);
- a divergence that comes back after every rewind ends as ``diverged`` (exit code 3);
- clean runs with three seeds trigger no rewind and skip fewer than 0.5% of their steps.

Scenario numbers (steps, factors, batch sizes) are chosen so every run is real and CPU-cheap;
docs/divergence.md lists the measured outcomes.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.support.jobs import SEQ_LEN, train_job
from tests.support.procs import events, running, wait_for, write_config

pytestmark = pytest.mark.slow

RUN_ID = "div"
FAULTS_ENV = {"ELASTICD_ALLOW_FAULTS": "1"}
EXIT_DIVERGED = 3

# The post-LN rewind scenario. Checkpoints every 100 steps, 3 kept (retention keeps the rewind
# target on top anyway: docs/checkpoints.md#retention). The spike multiplies the lr of steps
# 210..219 by 100: the loss of step 211 jumps from ~2.9 to ~5 (near uniform over 257 bytes); on
# the third skipped step (213) the guard rewinds to step 100 (known-good since step 150), 111
# steps before the onset.
SPIKE_STEP = 210
SPIKE = {"kind": "lr_spike", "step": SPIKE_STEP, "factor": 100.0, "duration_steps": 10}
SPIKE_RUN_STEPS = 350


def job(tmp: Path, demo: Path, **overrides: Any) -> dict[str, Any]:
    """A pre-LN tiny model on 8 x 32 tokens per step; ``overrides`` merge per section."""
    return train_job(tmp, demo, run_id=RUN_ID, **overrides)


def spike_job(tmp: Path, demo: Path, *, faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Post-LN on 16 x 32 tokens per step (less grad-norm noise than 8 x 32)."""
    return job(
        tmp,
        demo,
        model={"norm_position": "post"},
        train={
            "steps": SPIKE_RUN_STEPS,
            "global_batch_tokens": 16 * SEQ_LEN,
            "micro_batch_size": 8,
            "log_sample_ids": True,
        },
        rewind={"min_steps_back": 100},
        faults=faults,
    )


def run_to_end(
    tmp: Path, doc: dict[str, Any], *, name: str, expect: int = 0, timeout_seconds: float = 240
) -> Path:
    """Run ``doc`` with two ranks until both exit; assert their exit code; rank 0's log."""
    config = write_config(tmp / f"{name}.yaml", doc)
    with running(config, world_size=2, log_dir=tmp / name, env=FAULTS_ENV) as group:
        codes = group.wait(timeout_seconds=timeout_seconds)
        assert codes == [expect, expect], group.rank0_log.read_text()[-3000:]
        return group.rank0_log


def passes(log: Path) -> list[list[dict[str, Any]]]:
    """Step lines split into timelines: a new one starts where the step number goes back."""
    out: list[list[dict[str, Any]]] = []
    for line in events(log, "step"):
        if not out or line["step"] <= out[-1][-1]["step"]:
            out.append([])
        out[-1].append(line)
    return out


def replayed_up_to(log: Path) -> int:
    """The last step of the first replay so far (0 before a rewind)."""
    timelines = passes(log)
    return timelines[1][-1]["step"] if len(timelines) > 1 else 0


def trace(log: Path) -> list[tuple[int, float, float, bool]]:
    return [(r["step"], r["loss"], r["grad_norm"], r["skipped"]) for r in events(log, "step")]


def manifest(tmp: Path, step: int) -> dict[str, Any]:
    path = tmp / "ckpt" / RUN_ID / f"step-{step}" / "manifest.json"
    return dict(json.loads(path.read_text()))


def nonfinite_tensors(checkpoint_dir: Path, scratch: Path) -> list[str]:
    """Names of floating-point tensors in a DCP checkpoint holding NaN or Inf (all loaded)."""
    dcp_to_torch_save(checkpoint_dir, scratch / "flat.pt")
    tensors = dict(_flat(torch.load(scratch / "flat.pt", weights_only=False)))
    assert "/model/tok_emb.weight" in tensors and any(k.startswith("/optim/") for k in tensors)
    return [
        name
        for name, value in tensors.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


def _flat(value: Any, name: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flat(v, f"{name}/{k}")]
    return [(name, value)]


def only(log: Path, event: str) -> dict[str, Any]:
    found = events(log, event)
    assert len(found) == 1, f"expected one {event!r} line, got {found}"
    return found[0]


# ------------------------------------------------------------------------------------ NaN


def test_nan_step_is_dropped_and_training_continues_with_finite_weights(
    tmp_path: Path, demo_corpus: Path
) -> None:
    faults = [
        {"kind": "poison_batch", "step": 100, "mode": "random"},
        {"kind": "nan", "step": 150},
    ]
    # 16 x 32 tokens per step: at 8 x 32 the loss of single batches is so noisy that rank 0's
    # half of a batch replaced by random tokens (loss ~2.9 -> ~4.7) stays under 6 sigma.
    train = {"global_batch_tokens": 16 * SEQ_LEN, "micro_batch_size": 8}
    log = run_to_end(tmp_path, job(tmp_path, demo_corpus, train=train, faults=faults), name="logs")

    steps = {r["step"]: r for r in events(log, "step")}
    assert sorted(steps) == list(range(1, 201))  # no rewind: one timeline
    assert steps[150]["skipped"] is True
    assert steps[100]["skipped"] is True  # the poisoned batch is dropped on its own step too
    flagged = {e["step"]: e for e in events(log, "divergence")}
    assert flagged[150]["kind"] == "nan" and flagged[150]["action"] == "skip_step"
    assert flagged[100]["kind"] == "loss_spike" and flagged[100]["action"] == "skip_step"
    assert not events(log, "rewind")
    # Training goes on: every later loss is finite and the model still learns.
    later = [steps[s]["loss"] for s in range(151, 201)]
    assert all(map(_finite, later))
    assert statistics.median(later) < statistics.median(r["loss"] for r in steps.values())
    assert only(log, "done")["step"] == 200
    # The ledger of the next checkpoint records the dropped update.
    ledger = manifest(tmp_path, 200)["meta"]["ledger"]
    dropped = [e for e in ledger["events"] if e["event"] == "divergence" and e["step"] == 150]
    assert dropped == [
        {
            "event": "divergence",
            "step": 150,
            "kind": "nan",
            "action": "skip_step",
            "onset_step": 150,
        }
    ]
    assert ledger["data"] == []  # a skipped step changes no data decision
    assert nonfinite_tensors(tmp_path / "ckpt" / RUN_ID / "step-200", tmp_path) == []


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


# ---------------------------------------------------------------------------- lr spike


@pytest.fixture(scope="module")
def unspiked(tmp_path_factory: pytest.TempPathFactory, demo_corpus: Path) -> Path:
    tmp = tmp_path_factory.mktemp("unspiked")
    return run_to_end(tmp, spike_job(tmp, demo_corpus, faults=[]), name="logs")


@pytest.fixture(scope="module")
def spiked(tmp_path_factory: pytest.TempPathFactory, demo_corpus: Path) -> Path:
    tmp = tmp_path_factory.mktemp("spiked")
    return run_to_end(tmp, spike_job(tmp, demo_corpus, faults=[SPIKE]), name="logs")


def test_lr_spike_on_post_ln_rewinds_100_steps_back_and_finishes_near_the_clean_run(
    spiked: Path, unspiked: Path
) -> None:
    rewind = only(spiked, "rewind")
    onset, trigger, to_step = rewind["onset_step"], rewind["trigger_step"], rewind["to_step"]
    assert SPIKE_STEP < onset <= trigger <= SPIKE_STEP + 10
    assert onset - to_step >= 100
    assert rewind["data_action"] == "reshuffle"
    assert rewind["window"] == [to_step + 1, trigger + 1]

    first, replay = passes(spiked)
    assert (first[-1]["step"], replay[0]["step"]) == (trigger, to_step + 1)
    # The divergence is real: the loss blew up well past its recent level before the rewind.
    before = statistics.median(
        r["loss"] for r in first if SPIKE_STEP - 50 <= r["step"] < SPIKE_STEP
    )
    assert max(r["loss"] for r in first if r["step"] > SPIKE_STEP) > 1.5 * before
    # The window was reshuffled: other samples inside it, the same ones after it.
    clean = {r["step"]: r for r in events(unspiked, "step")}
    redone = {r["step"]: r for r in replay}
    inside = range(to_step + 1, trigger + 1)
    assert all(redone[s]["sample_ids"] != clean[s]["sample_ids"] for s in inside)
    after = range(trigger + 1, SPIKE_RUN_STEPS + 1)
    assert all(redone[s]["sample_ids"] == clean[s]["sample_ids"] for s in after)
    # The replay does not meet the spike again (it fired once), and the run completes.
    spiked_lr = {r["step"]: r["lr"] for r in first}
    assert spiked_lr[SPIKE_STEP] == pytest.approx(100 * clean[SPIKE_STEP]["lr"])
    assert all(redone[s]["lr"] == clean[s]["lr"] for s in range(SPIKE_STEP, SPIKE_STEP + 10))
    final, reference = only(spiked, "done")["final_loss"], only(unspiked, "done")["final_loss"]
    assert abs(final / reference - 1) < 0.02, (final, reference)


def test_rewind_and_reshuffle_repeat_bit_for_bit(
    tmp_path: Path, demo_corpus: Path, spiked: Path
) -> None:
    again = run_to_end(tmp_path, spike_job(tmp_path, demo_corpus, faults=[SPIKE]), name="again")

    assert trace(again) == trace(spiked)  # float equality: bitwise, both timelines
    keys = ("to_step", "onset_step", "trigger_step", "data_action", "window")
    assert [{k: e[k] for k in keys} for e in events(again, "rewind")] == [
        {k: e[k] for k in keys} for e in events(spiked, "rewind")
    ]


def test_sigkill_during_replay_resumes_with_the_same_ledger_and_losses(
    tmp_path: Path, demo_corpus: Path, spiked: Path
) -> None:
    config = write_config(tmp_path / "job.yaml", spike_job(tmp_path, demo_corpus, faults=[SPIKE]))
    with running(config, world_size=2, log_dir=tmp_path / "first", env=FAULTS_ENV) as group:
        # Twenty steps into the replay, long before its first commit (step 200).
        wait_for(
            lambda: replayed_up_to(group.rank0_log) >= 120,
            timeout_seconds=240,
            what="20 replayed steps",
            interval=0.05,
        )
        for proc in group.procs:
            os.killpg(proc.pid, signal.SIGKILL)
    rewind = only(tmp_path / "first" / "rank0.log", "rewind")
    root = tmp_path / "ckpt" / RUN_ID
    stored = json.loads((root / "ledger.json").read_text())
    assert stored["data"] == [
        {
            "kind": "reshuffle",
            "start_step": rewind["to_step"] + 1,
            "end_step": rewind["trigger_step"] + 1,
            "salt": 1,
        }
    ]
    assert not (tmp_path / "ckpt" / "ledger.json").exists()  # per run, beside its checkpoints

    resumed = run_to_end(tmp_path, spike_job(tmp_path, demo_corpus, faults=[SPIKE]), name="second")

    # Killed before the replay's first commit: the newest checkpoint predates the rewind, so the
    # reshuffle decision and the guard state can only have come from ledger.json.
    assert only(resumed, "checkpoint_load")["step"] == rewind["to_step"]
    assert not events(resumed, "rewind") and not events(resumed, "fault_injected")
    _, replay = passes(spiked)
    assert [(r["step"], r["loss"], r["sample_ids"]) for r in events(resumed, "step")] == [
        (r["step"], r["loss"], r["sample_ids"]) for r in replay
    ]
    ledger = manifest(tmp_path, SPIKE_RUN_STEPS)["meta"]["ledger"]
    assert ledger["data"] == stored["data"]
    assert [e["to_step"] for e in ledger["events"] if e["event"] == "rewind"] == [rewind["to_step"]]


# ------------------------------------------------------------------------ gives up


def test_divergence_that_returns_after_every_rewind_ends_diverged(
    tmp_path: Path, demo_corpus: Path
) -> None:
    # A permanent blow-up: the spike re-fires whenever step 100 is reached (times: 0). Short
    # distances keep it cheap: checkpoints every 20 steps, known-good after 10 healthy steps.
    doc = job(
        tmp_path,
        demo_corpus,
        checkpoint={"interval_steps": 20, "keep_last": 4},
        rewind={"min_steps_back": 10, "good_after_steps": 10, "max_rewinds": 2},
        faults=[
            {"kind": "lr_spike", "step": 100, "factor": 100.0, "duration_steps": 10_000, "times": 0}
        ],
    )
    log = run_to_end(tmp_path, doc, name="logs", expect=EXIT_DIVERGED)

    rewinds = events(log, "rewind")
    assert [r["data_action"] for r in rewinds] == ["reshuffle", "skip"]
    assert all(r["onset_step"] - r["to_step"] >= 10 for r in rewinds)
    diverged = only(log, "diverged")
    assert "rewind budget spent" in " ".join(diverged["reasons"])
    assert not events(log, "done")
    assert len(passes(log)) == 3  # the first timeline and two replays, then it stopped
    ledger = json.loads((tmp_path / "ckpt" / RUN_ID / "ledger.json").read_text())
    assert ledger["events"][-1]["event"] == "diverged"
    # A clean exit: no traceback on any rank.
    for rank_log in (tmp_path / "logs").glob("rank*.log"):
        assert "Traceback" not in rank_log.read_text()


# ------------------------------------------------------------------- false positives


@pytest.mark.timeout(480)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_clean_run_triggers_no_rewind_and_skips_under_half_a_percent(
    tmp_path: Path, demo_corpus: Path, seed: int
) -> None:
    # 64 x 32 tokens per step. Smaller batches make single-batch grad norms heavy-tailed: with
    # the default guard, 8 x 32 skipped 5-13 steps per 1,000 (one seed ended diverged), 32 x 32
    # skipped 0, 1 and 4 for these seeds; 64 x 32 skips 0, 1 and 1 (docs/divergence.md).
    doc = job(
        tmp_path,
        demo_corpus,
        checkpoint={"interval_steps": 250, "keep_last": 2},
        data={"seed": 100 + seed},
        train={
            "steps": 1000,
            "seed": seed,
            "global_batch_tokens": 64 * SEQ_LEN,
            "micro_batch_size": 32,
        },
    )
    log = run_to_end(tmp_path, doc, name="logs", timeout_seconds=420)

    lines = events(log, "step")
    assert [r["step"] for r in lines] == list(range(1, 1001))
    assert not events(log, "rewind")
    skipped = [r["step"] for r in lines if r["skipped"]]
    assert len(skipped) < 5, skipped  # < 0.5% of 1,000 steps
