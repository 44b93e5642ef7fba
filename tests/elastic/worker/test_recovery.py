"""Recovery: rewind plans, the run ledger, committed and known-good checkpoints."""

from __future__ import annotations

import time
from typing import Any

import pytest

from elastic.checkpoint import Manifest
from elastic.guard import Action, GuardConfig, RewindConfig, RewindPlan
from elastic.worker.ledger import RunLedger
from elastic.worker.recovery import Recovery, RunFiles

GOOD_AFTER = 5


def recovery(files: RunFiles, *, is_main: bool = True, data: str = "reshuffle") -> Recovery:
    rewind = RewindConfig(good_after_steps=GOOD_AFTER, data=data)  # type: ignore[arg-type]
    return Recovery(GuardConfig(), rewind, files=files, is_main=is_main)


def healthy(r: Recovery, steps: range) -> None:
    for step in steps:
        verdict = r.observe(step, loss=3.0 - 0.001 * step, grad_norm=1.0, finite=True)
        assert verdict.action is Action.OK


def stored_ledger(files: RunFiles) -> RunLedger:
    return RunLedger.from_json(RunLedger.loads(files.read_bytes(RunLedger.FILE)))


def manifest(step: int, meta: dict[str, Any], *, known_good: bool = False) -> Manifest:
    return Manifest(
        step=step, world_size=1, time_unix=time.time(), files={}, known_good=known_good, meta=meta
    )


def operator_rewind(r: Recovery, to_step: int, *, trigger_step: int) -> RewindPlan:
    plan = r.operator_plan(to_step, trigger_step=trigger_step)
    assert plan is not None
    return plan


def test_operator_plan_refuses_a_step_that_was_never_committed(run_files: RunFiles) -> None:
    r = recovery(run_files)
    healthy(r, range(1, 11))
    r.saved(4)
    assert r.operator_plan(6, trigger_step=10) is None
    plan = operator_rewind(r, 4, trigger_step=10)
    assert (plan.to_step, plan.onset_step, plan.trigger_step) == (4, 5, 10)
    assert plan.window == (5, 11)


def test_rewind_books_the_data_window_trims_committed_and_writes_the_ledger(
    run_files: RunFiles,
) -> None:
    r = recovery(run_files)
    healthy(r, range(1, 13))
    for step in (4, 8, 12):
        r.saved(step)
    details = r.rewind(operator_rewind(r, 4, trigger_step=12))

    assert details["window"] == [5, 13]
    assert r.ledger.data_entries == [
        {"kind": "reshuffle", "start_step": 5, "end_step": 13, "salt": 1}
    ]
    assert r.data.resolve(5) == (5, 1)
    assert r.data.resolve(13) == (13, 0)
    assert r.committed == {4: False}
    assert len(r.guard.history) == 1
    stored = stored_ledger(run_files)
    assert stored.at_step == 4
    assert stored.data_entries == r.ledger.data_entries
    assert stored.guard is not None and len(stored.guard["history"]) == 1
    assert [e["event"] for e in stored.events] == ["rewind"]


def test_a_skip_rewind_moves_later_steps_onto_later_data(run_files: RunFiles) -> None:
    r = recovery(run_files, data="skip")
    healthy(r, range(1, 11))
    r.saved(4)
    r.rewind(operator_rewind(r, 4, trigger_step=10))
    assert r.data.resolve(5) == (11, 0)


def test_only_rank_0_writes_the_ledger_file(run_files: RunFiles) -> None:
    r = recovery(run_files, is_main=False)
    healthy(r, range(1, 11))
    r.saved(4)
    r.rewind(operator_rewind(r, 4, trigger_step=10))
    assert not run_files.exists(RunLedger.FILE)
    assert r.ledger.at_step == 4  # the bookkeeping itself happens on every rank


def test_give_up_records_the_reasons_in_the_stored_ledger(run_files: RunFiles) -> None:
    recovery(run_files).give_up(30, ["budget spent"])
    assert stored_ledger(run_files).events == [
        {"event": "diverged", "step": 30, "reasons": ["budget spent"]}
    ]


def test_promotions_mark_checkpoints_known_good_after_enough_healthy_steps(
    run_files: RunFiles,
) -> None:
    r = recovery(run_files)
    healthy(r, range(1, 5))
    r.saved(4)
    healthy(r, range(5, 4 + GOOD_AFTER))
    assert r.promotions(3 + GOOD_AFTER) == []
    healthy(r, range(4 + GOOD_AFTER, 5 + GOOD_AFTER))
    assert r.promotions(4 + GOOD_AFTER) == [4]
    assert r.committed == {4: True}
    assert r.promotions(5 + GOOD_AFTER) == []  # once


def test_meta_carries_ledger_guard_and_health(run_files: RunFiles) -> None:
    r = recovery(run_files)
    meta = r.meta(last_loss=float("nan"))
    assert set(meta) == {"ledger", "guard", "health"}
    assert meta["health"] == {"loss": None, "guard_state": "ok"}
    assert r.meta(last_loss=2.5)["health"]["loss"] == 2.5


def test_adopt_of_no_checkpoint_starts_fresh(run_files: RunFiles) -> None:
    r = recovery(run_files)
    r.adopt(None, listed=[manifest(4, {})])
    assert r.committed == {}
    assert r.ledger.data_entries == []


def test_adopt_continues_from_the_manifest_and_lists_committed_steps(
    run_files: RunFiles,
) -> None:
    before = recovery(run_files)
    healthy(before, range(1, 9))
    meta = before.meta(last_loss=2.0)
    listed = [manifest(4, {}, known_good=True), manifest(8, meta), manifest(12, {})]
    after = recovery(run_files)
    after.adopt(listed[1], listed=listed)
    assert after.committed == {4: True, 8: False}  # 12 lies after the step resumed from
    assert after.guard.state_dict() == before.guard.state_dict()


def rewound(run_files: RunFiles) -> tuple[Recovery, dict[int, dict[str, Any]]]:
    """A run that saved 4 and 8, then rewound to 4 at step 12 (the ledger file is written);
    the metas of its checkpoints."""
    first = recovery(run_files)
    healthy(first, range(1, 11))
    first.saved(4)
    metas = {4: first.meta(last_loss=2.0)}
    healthy(first, range(11, 13))
    first.saved(8)
    metas[8] = first.meta(last_loss=2.0)
    first.rewind(operator_rewind(first, 4, trigger_step=12))
    return first, metas


def restart(run_files: RunFiles, metas: dict[int, dict[str, Any]], step: int) -> Recovery:
    listed = [manifest(s, meta) for s, meta in sorted(metas.items())]
    restarted = recovery(run_files)
    restarted.adopt(manifest(step, metas[step]), listed=listed)
    return restarted


def test_adopt_prefers_the_stored_guard_when_a_rewind_came_after_the_checkpoint(
    run_files: RunFiles,
) -> None:
    first, metas = rewound(run_files)
    restarted = restart(run_files, {4: metas[4]}, 4)  # killed during the replay
    assert len(restarted.guard.history) == 1
    assert restarted.guard.state_dict() == first.guard.state_dict()
    assert restarted.ledger.data_entries == first.ledger.data_entries  # merged from the file
    assert restarted.data.resolve(5) == (5, 1)
    assert restarted.committed == {4: False}


def test_adopt_keeps_the_manifest_guard_when_the_checkpoint_is_newer_than_the_rewind(
    run_files: RunFiles,
) -> None:
    first, metas = rewound(run_files)
    healthy(first, range(5, 9))  # the replay, then a save of step 8 again
    first.saved(8)
    metas[8] = first.meta(last_loss=2.0)
    stored_guard = stored_ledger(run_files).guard
    restarted = restart(run_files, metas, 8)
    assert restarted.guard.state_dict() == metas[8]["guard"] != stored_guard
    assert len(restarted.guard.history) == 1
    assert restarted.committed == {4: False, 8: False}


@pytest.mark.parametrize("rank_is_main", [True, False])
def test_lr_scale_follows_the_rewinds_multiplier(run_files: RunFiles, rank_is_main: bool) -> None:
    rewind = RewindConfig(lr_multiplier=0.5, lr_multiplier_steps=3)
    r = Recovery(GuardConfig(), rewind, files=run_files, is_main=rank_is_main)
    healthy(r, range(1, 11))
    r.saved(4)
    r.rewind(operator_rewind(r, 4, trigger_step=10))
    assert [r.lr_scale(s) for s in (4, 5, 6, 7)] == [0.5, 0.5, 0.5, 1.0]
