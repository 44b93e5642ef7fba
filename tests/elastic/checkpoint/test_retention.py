"""Retention's pure policy: keep_last, the newest known-good, and what a rewind may still need
(unit cases, a property over future onsets, and a whole guarded run with keep_last 1)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from elastic.checkpoint import Manifest
from elastic.checkpoint.retention import RewindHorizon, plan_retention
from elastic.guard import (
    Action,
    CheckpointInfo,
    Guard,
    GuardConfig,
    RewindConfig,
    RewindPlan,
    promotion_horizon_steps,
    rewind_lookback_steps,
)
from elastic.guard.planning import choose_target
from elastic.worker.recovery import rewind_horizon
from tests.elastic.guard.curves import Point, healthy_curve, lr_blowup


def _committed(*steps: int, good: tuple[int, ...] = ()) -> list[Manifest]:
    return [
        Manifest(step=s, world_size=2, time_unix=0.0, files={}, known_good=s in good) for s in steps
    ]


def test_keeps_the_newest_k_committed() -> None:
    plan = plan_retention(_committed(10, 20, 30, 40), [], keep_last=2)
    assert plan.delete_committed == (10, 20)
    assert plan.delete_torn == ()


def test_keeps_the_newest_known_good_even_when_older_than_k() -> None:
    plan = plan_retention(_committed(10, 20, 30, 40, 50, good=(10, 20)), [], keep_last=2)
    assert plan.delete_committed == (10, 30)


def test_known_good_inside_the_window_adds_nothing() -> None:
    plan = plan_retention(_committed(10, 20, 30, good=(30,)), [], keep_last=2)
    assert plan.delete_committed == (10,)


def test_removes_torn_dirs_only_below_the_newest_committed_step() -> None:
    plan = plan_retention(_committed(10, 20), [5, 15, 20, 25], keep_last=3)
    assert plan.delete_torn == (5, 15)
    assert plan.delete_committed == ()


def test_without_committed_checkpoints_nothing_is_deleted() -> None:
    plan = plan_retention([], [1, 2, 3], keep_last=2)
    assert plan.delete_committed == ()
    assert plan.delete_torn == ()


def test_fewer_than_k_keeps_everything() -> None:
    assert plan_retention(_committed(1, 2), [], keep_last=3).delete_committed == ()


def test_keep_last_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="keep_last=0"):
        plan_retention(_committed(1), [], keep_last=0)


# ----------------------------------------------------------------- with a rewind horizon
def _horizon(lookback: int | None, promotion: int = 1) -> RewindHorizon:
    return RewindHorizon(target_lookback_steps=lookback, promotion_steps=promotion)


def test_keep_last_one_keeps_every_known_good_a_rewind_may_still_choose() -> None:
    committed = _committed(*range(10, 210, 10), good=tuple(range(10, 160, 10)))
    plan = plan_retention(committed, [], keep_last=1, horizon=_horizon(100))
    # Limit 200 - 100 = 100: the known-good 110..150 may be chosen, and 100, the newest at or
    # below the limit; 10..90 never again.
    assert plan.delete_committed == (*range(10, 100, 10), 160, 170, 180, 190)


def test_checkpoints_awaiting_promotion_are_kept_inside_the_promotion_horizon() -> None:
    committed = _committed(10, 20, 30, 40, 50, good=(10,))
    plan = plan_retention(committed, [], keep_last=1, horizon=_horizon(0, promotion=25))
    # 50 - 30 = 20 < 25 keeps 30 and 40; 20 is past it (never promoted now); 10 is the target.
    assert plan.delete_committed == (20,)


def test_without_a_lookback_only_the_newest_known_good_is_kept_on_top() -> None:
    committed = _committed(10, 20, 30, 40, good=(10, 20))
    plan = plan_retention(committed, [], keep_last=1, horizon=_horizon(None))
    assert plan.delete_committed == (10, 30)


def test_bad_horizons_are_rejected() -> None:
    with pytest.raises(ValueError, match="target_lookback_steps=-1"):
        _horizon(-1)
    with pytest.raises(ValueError, match="promotion_steps=0"):
        _horizon(10, promotion=0)


@pytest.mark.parametrize("seed", range(20))
def test_every_target_a_future_onset_chooses_survives_retention(seed: int) -> None:
    """For any onset from ``newest - max_onset_lag`` on, choose_target over what retention
    keeps gives the same checkpoint as over everything committed."""
    rng = random.Random(seed)
    interval = rng.choice((1, 5, 10, 50))
    steps = range(interval, interval * rng.randint(2, 60) + 1, interval)
    committed = _committed(*steps, good=tuple(s for s in steps if rng.random() < 0.6))
    back, lag = rng.choice((0, 10, 100)), rng.choice((0, 9, 49))
    plan = plan_retention(committed, [], keep_last=1, horizon=_horizon(back + lag))
    infos = [CheckpointInfo(m.step, m.known_good) for m in committed]
    kept = [c for c in infos if c.step not in plan.delete_committed]
    newest = steps[-1]
    for onset in range(newest - lag, newest + 3 * back + 2 * interval):
        full = choose_target(infos, onset_step=onset, min_steps_back=back)
        assert choose_target(kept, onset_step=onset, min_steps_back=back) == full


# ----------------------------------------------------------------- a run under the guard
GUARD = GuardConfig()
REWIND = RewindConfig(max_rewinds=50, min_steps_back=100, good_after_steps=50)


@dataclass
class _Disk:
    """Committed checkpoints as storage holds them: step -> known-good."""

    steps: dict[int, bool] = field(default_factory=dict)
    most_kept: int = 0

    def save(self, step: int, *, keep_last: int, horizon: RewindHorizon | None) -> None:
        self.steps[step] = False
        manifests = _committed(*self.steps, good=tuple(s for s, g in self.steps.items() if g))
        plan = plan_retention(manifests, [], keep_last=keep_last, horizon=horizon)
        for gone in plan.delete_committed:
            del self.steps[gone]
        self.most_kept = max(self.most_kept, len(self.steps))


@dataclass(frozen=True)
class _Outcome:
    rewinds: int
    missing: tuple[str, ...]  # rewind targets or promotions that retention had deleted
    most_kept: int


def _train(
    seed: int,
    *,
    interval: int,
    keep_last: int,
    horizon: RewindHorizon | None,
    guard: GuardConfig = GUARD,
    rewind: RewindConfig = REWIND,
) -> _Outcome:
    """The trainer's order of calls (observe, rewind or save, promotions) on a troubled curve,
    with retention after every save; a replayed window is healthy (reshuffled data)."""
    rng = random.Random(seed)
    healthy = {p.step: p for p in healthy_curve(seed=seed, num_steps=1500)}
    troubled = {
        s: Point(s, p.loss * 3.0, p.grad_norm) if rng.random() < 0.03 else p
        for s, p in healthy.items()
    }
    troubled |= {p.step: p for p in lr_blowup(list(healthy.values()), start_step=1300)}
    policy = Guard(guard, rewind)
    disk, committed, missing = _Disk(), {0: True}, []
    disk.steps[0] = True  # the initial state, known-good
    step, replay_until, rewinds = 1, 0, 0
    while step < 1500:
        p = healthy[step] if step <= replay_until else troubled[step]
        verdict = policy.observe(step, loss=p.loss, grad_norm=p.grad_norm, finite=True)
        if verdict.action is Action.GIVE_UP:
            break
        if verdict.action is Action.REWIND:
            infos = [CheckpointInfo(s, g) for s, g in sorted(committed.items())]
            plan = policy.plan_rewind(verdict, trigger_step=step, checkpoints=infos)
            if not isinstance(plan, RewindPlan):
                break
            if not disk.steps.get(plan.to_step, False):
                missing.append(f"rewind target {plan.to_step} at step {step}")
            policy.record_rewind(plan)
            disk.steps = {s: g for s, g in disk.steps.items() if s <= plan.to_step}
            committed = {s: g for s, g in committed.items() if s <= plan.to_step}
            replay_until, step, rewinds = step, plan.to_step + 1, rewinds + 1
            continue
        if step % interval == 0:
            disk.save(step, keep_last=keep_last, horizon=horizon)
            committed[step] = False  # Recovery never forgets a deleted checkpoint
        infos = [CheckpointInfo(s, g) for s, g in sorted(committed.items())]
        for promoted in policy.promotions(step=step, checkpoints=infos):
            if promoted not in disk.steps:
                missing.append(f"promotion of {promoted} at step {step}")
            disk.steps[promoted] = committed[promoted] = True
        step += 1
    return _Outcome(rewinds=rewinds, missing=tuple(missing), most_kept=disk.most_kept)


@pytest.mark.parametrize("interval", [3, 10, 50, 250])
@pytest.mark.parametrize("seed", [0, 1])
def test_keep_last_one_never_loses_a_rewind_target_or_a_promotion(seed: int, interval: int) -> None:
    horizon = rewind_horizon(GUARD, REWIND)
    outcome = _train(seed, interval=interval, keep_last=1, horizon=horizon)
    assert outcome.rewinds >= 2
    assert outcome.missing == ()
    lookback = rewind_lookback_steps(rewind=REWIND, guard=GUARD)
    promotion = promotion_horizon_steps(rewind=REWIND, guard=GUARD)
    assert lookback is not None
    # Storage stays bounded by the horizons, not by the length of the run.
    assert outcome.most_kept <= 3 + (lookback + promotion) // interval


def test_keep_last_one_without_the_horizon_would_lose_rewind_targets() -> None:
    """What the horizon is for: the same run keeping only the newest and the newest known-good
    checkpoint rewinds to checkpoints that are gone."""
    outcome = _train(0, interval=10, keep_last=1, horizon=None)
    assert outcome.rewinds >= 2
    assert any(m.startswith("rewind target") for m in outcome.missing)
