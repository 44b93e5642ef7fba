"""Guard verdicts: skip, escalation to rewind, give-up, known-good promotion."""

from __future__ import annotations

import pytest

from elastic.guard import (
    Action,
    CheckpointInfo,
    GiveUp,
    Guard,
    GuardState,
    GuardStateError,
    RewindPlan,
    Verdict,
)
from tests.elastic.guard.curves import Point, healthy_curve, lr_blowup
from tests.elastic.guard.helpers import feed, healthy_at, make_guard, sigma_spike, warmed

NAN = float("nan")


def _observe_spike(guard: Guard, step: int, *, sigmas: float = 10.0) -> Verdict:
    """A loss ``sigmas`` robust sigma above the window median, healthy grad norm."""
    loss = sigma_spike(guard, sigmas=sigmas)
    return guard.observe(step, loss=loss, grad_norm=healthy_at(step).grad_norm, finite=True)


def _nan(guard: Guard, step: int) -> Verdict:
    return guard.observe(step, loss=NAN, grad_norm=1.0, finite=False)


def test_nan_loss_skips_the_step_with_a_reason() -> None:
    guard = warmed()
    verdict = guard.observe(200, loss=float("nan"), grad_norm=1.0, finite=False)
    assert verdict.action is Action.SKIP_STEP
    assert verdict.kind == "nan" and verdict.onset_step == 200
    assert "non-finite" in verdict.reasons[0]
    assert guard.state is GuardState.WATCHING


def test_non_finite_gradient_flag_alone_skips_the_step() -> None:
    guard = warmed()
    verdict = guard.observe(200, loss=2.5, grad_norm=1.0, finite=False)
    assert (verdict.action, verdict.kind) == (Action.SKIP_STEP, "nan")
    verdict = guard.observe(260, loss=2.5, grad_norm=float("inf"), finite=True)
    assert (verdict.action, verdict.kind) == (Action.SKIP_STEP, "nan")


def test_warmup_is_silent_except_for_nan() -> None:
    guard = make_guard()
    verdicts = feed(guard, healthy_curve(seed=0, num_steps=30))
    big = guard.observe(30, loss=1e6, grad_norm=1e6, finite=True)
    nan = guard.observe(31, loss=float("nan"), grad_norm=1.0, finite=True)
    assert all(v.action is Action.OK for v in verdicts)
    assert big.action is Action.OK
    assert nan.action is Action.SKIP_STEP and nan.kind == "nan"


def test_single_ten_sigma_spike_is_skipped_and_kept_out_of_the_window() -> None:
    guard = warmed()
    window_before = guard.state_dict()["samples"]
    verdict = _observe_spike(guard, 200)
    assert (verdict.action, verdict.kind, verdict.onset_step) == (
        Action.SKIP_STEP,
        "loss_spike",
        200,
    )
    assert verdict.loss_z == pytest.approx(10.0)
    assert guard.state_dict()["samples"] == window_before
    after = feed(guard, healthy_curve(seed=0, num_steps=100, start_step=201))
    assert all(v.action is Action.OK for v in after)
    assert guard.state is GuardState.OK


def test_grad_norm_spike_alone_is_skipped() -> None:
    guard = warmed()
    base = healthy_at(200)
    grad = sigma_spike(guard, sigmas=8.0, field=2)
    verdict = guard.observe(200, loss=base.loss, grad_norm=grad, finite=True)
    assert (verdict.action, verdict.kind) == (Action.SKIP_STEP, "grad_spike")


def test_five_sigma_bump_passes() -> None:
    guard = warmed()
    bump = sigma_spike(guard, sigmas=5.0)
    assert guard.observe(200, loss=bump, grad_norm=1.0, finite=True).action is Action.OK


def _spikes_at(guard: Guard, steps: set[int], *, last: int) -> list[Verdict]:
    """Healthy steps 200 .. ``last`` with a 10-sigma loss spike at ``steps``; their verdicts."""
    verdicts = []
    for point in healthy_curve(seed=0, num_steps=last - 199, start_step=200):
        if point.step in steps:
            verdicts.append(_observe_spike(guard, point.step))
        else:
            guard.observe(point.step, loss=point.loss, grad_norm=point.grad_norm, finite=True)
    return verdicts


def test_three_skips_within_fifty_steps_rewind_from_the_first() -> None:
    guard = warmed()
    verdicts = _spikes_at(guard, {210, 230, 259}, last=259)
    actions = [v.action for v in verdicts]
    assert actions == [Action.SKIP_STEP, Action.SKIP_STEP, Action.REWIND]
    assert (verdicts[-1].onset_step, verdicts[-1].kind) == (210, "loss_spike")
    assert "3 skipped steps within 50 steps" in verdicts[-1].reasons[-1]
    assert guard.state is GuardState.REWINDING
    with pytest.raises(GuardStateError):
        guard.observe(260, loss=2.0, grad_norm=1.0, finite=True)


def test_skips_further_apart_than_the_window_do_not_rewind() -> None:
    guard = warmed()
    verdicts = _spikes_at(guard, {200, 240, 290, 340}, last=400)
    assert [v.action for v in verdicts] == [Action.SKIP_STEP] * 4
    assert guard.state is GuardState.OK


def test_second_nan_within_the_window_rewinds() -> None:
    guard = warmed()
    first = _nan(guard, 200)
    feed(guard, healthy_curve(seed=0, num_steps=30, start_step=201))
    second = guard.observe(231, loss=float("inf"), grad_norm=1.0, finite=False)
    assert first.action is Action.SKIP_STEP
    assert (second.action, second.kind, second.onset_step) == (Action.REWIND, "nan", 200)


def test_sustained_elevation_rewinds_from_its_start() -> None:
    guard = warmed(num_steps=600, seed=3)
    noisy = healthy_curve(seed=3, num_steps=400, start_step=600, loss_noise=0.02)
    raised = [Point(p.step, p.loss * 1.1, p.grad_norm) for p in noisy]
    verdicts = feed(guard, raised)
    last = verdicts[-1]
    assert (last.action, last.kind) == (Action.REWIND, "sustained")
    assert last.onset_step is not None and 600 <= last.onset_step <= 610
    assert len(verdicts) <= 40  # detected within 40 steps of the shift


def test_lr_blowup_rewinds_within_a_few_steps_from_the_grad_norm_onset() -> None:
    guard = make_guard()
    points = lr_blowup(healthy_curve(seed=1, num_steps=1000), start_step=500, growth=1.25)
    verdicts = feed(guard, points)
    last = verdicts[-1]
    assert last.action is Action.REWIND
    assert len(verdicts) - 1 <= 510  # trigger step within 10 steps of the blow-up
    assert last.onset_step is not None and 500 <= last.onset_step <= 506


def _rewinding_guard(**overrides: object) -> tuple[Guard, Verdict]:
    guard = warmed(num_steps=1000, **overrides)
    _nan(guard, 1000)
    verdict = _nan(guard, 1001)
    assert verdict.action is Action.REWIND and verdict.onset_step == 1000
    return guard, verdict


CHECKPOINTS = [
    CheckpointInfo(step=600, known_good=True),
    CheckpointInfo(step=800, known_good=True),
    CheckpointInfo(step=950, known_good=True),  # only 50 steps before the onset
    CheckpointInfo(step=900, known_good=True),
    CheckpointInfo(step=700, known_good=False),
    CheckpointInfo(step=1000, known_good=False),
]


def test_plan_picks_newest_known_good_at_least_min_steps_back() -> None:
    guard, verdict = _rewinding_guard()
    plan = guard.plan_rewind(verdict, trigger_step=1001, checkpoints=CHECKPOINTS)
    assert isinstance(plan, RewindPlan)
    assert (plan.to_step, plan.onset_step, plan.trigger_step) == (900, 1000, 1001)
    assert plan.window == (900, 1002)
    assert plan.data_action == "reshuffle"
    assert (plan.lr_multiplier, plan.lr_multiplier_steps, plan.index) == (1.0, 0, 0)


def test_plan_result_does_not_depend_on_checkpoint_order() -> None:
    plans = []
    for order in (CHECKPOINTS, list(reversed(CHECKPOINTS)), sorted(CHECKPOINTS, key=str)):
        guard, verdict = _rewinding_guard()
        plans.append(guard.plan_rewind(verdict, trigger_step=1001, checkpoints=order))
    assert plans[0] == plans[1] == plans[2]


def test_plan_falls_back_to_a_nearer_known_good_checkpoint() -> None:
    guard, verdict = _rewinding_guard()
    near = [CheckpointInfo(950, True), CheckpointInfo(1000, True)]
    plan = guard.plan_rewind(verdict, trigger_step=1001, checkpoints=near)
    assert isinstance(plan, RewindPlan) and plan.to_step == 950
    assert "falling back" in plan.reasons[-1]


def test_no_known_good_checkpoint_gives_up() -> None:
    guard, verdict = _rewinding_guard()
    result = guard.plan_rewind(verdict, trigger_step=1001, checkpoints=[CheckpointInfo(900, False)])
    assert isinstance(result, GiveUp)
    assert "no known-good checkpoint before onset step 1000" in result.reasons[-1]
    assert guard.state is GuardState.DIVERGED
    again = guard.observe(1002, loss=2.0, grad_norm=1.0, finite=True)
    assert again.action is Action.GIVE_UP and again.reasons == result.reasons


def test_configured_skip_and_lr_multiplier_reach_the_plan() -> None:
    guard, verdict = _rewinding_guard(
        rewind_data="skip", rewind_lr_multiplier=0.5, rewind_lr_multiplier_steps=200
    )
    plan = guard.plan_rewind(verdict, trigger_step=1001, checkpoints=CHECKPOINTS)
    assert isinstance(plan, RewindPlan)
    assert (plan.data_action, plan.lr_multiplier, plan.lr_multiplier_steps) == ("skip", 0.5, 200)
    guard.record_rewind(plan)
    assert [guard.lr_scale(s) for s in (899, 900, 1099, 1100)] == [1.0, 0.5, 0.5, 1.0]


def _rewind_at(
    guard: Guard, start: int, *, checkpoints: list[CheckpointInfo]
) -> RewindPlan | GiveUp:
    """Two NaNs at ``start`` and ``start + 1``; the plan (recorded) or the give-up."""
    _nan(guard, start)
    verdict = _nan(guard, start + 1)
    if verdict.action is Action.GIVE_UP:
        return GiveUp(verdict.reasons)
    assert verdict.action is Action.REWIND
    result = guard.plan_rewind(verdict, trigger_step=start + 1, checkpoints=checkpoints)
    if isinstance(result, RewindPlan):
        guard.record_rewind(result)
    return result


def test_same_window_diverging_again_is_skipped() -> None:
    guard = warmed(num_steps=1000)
    first = _rewind_at(guard, 1000, checkpoints=CHECKPOINTS)
    assert isinstance(first, RewindPlan) and first.data_action == "reshuffle"
    feed(guard, healthy_curve(seed=0, num_steps=50, start_step=900))
    second = _rewind_at(guard, 950, checkpoints=CHECKPOINTS[:2])
    assert isinstance(second, RewindPlan)
    assert (second.to_step, second.data_action, second.index) == (800, "skip", 1)
    assert "already reshuffled by rewind 0" in second.reasons[-1]
    assert [p.window for p in guard.history] == [(900, 1002), (800, 952)]


def test_rewind_budget_exhausted_gives_up() -> None:
    guard = warmed(num_steps=1000)
    results = [_rewind_at(guard, 1000, checkpoints=CHECKPOINTS) for _ in range(4)]
    assert [type(r).__name__ for r in results] == ["RewindPlan"] * 3 + ["GiveUp"]
    assert "rewind budget spent: 3 rewinds" in results[-1].reasons[-1]
    assert guard.state is GuardState.DIVERGED


def test_rewinds_outside_the_budget_window_do_not_count() -> None:
    guard = warmed(num_steps=1000, rewind_max_rewinds=1, rewind_budget_window_steps=100)
    first = _rewind_at(guard, 1000, checkpoints=CHECKPOINTS)
    assert isinstance(first, RewindPlan)
    feed(guard, healthy_curve(seed=0, num_steps=300, start_step=900))
    late = [*CHECKPOINTS, CheckpointInfo(1100, True)]
    assert isinstance(_rewind_at(guard, 1200, checkpoints=late), RewindPlan)
    assert isinstance(_rewind_at(guard, 1200, checkpoints=late), GiveUp)


def test_escalation_with_rewinds_disabled_gives_up() -> None:
    guard = warmed(rewind_enabled=False)
    _nan(guard, 200)
    verdict = _nan(guard, 201)
    assert verdict.action is Action.GIVE_UP and "rewind.enabled=false" in verdict.reasons[-1]
    assert guard.state is GuardState.DIVERGED


def test_disabled_guard_passes_everything() -> None:
    guard = make_guard(enabled=False)
    verdict = guard.observe(0, loss=float("nan"), grad_norm=float("inf"), finite=False)
    assert verdict.action is Action.OK
    assert guard.promotions(step=60, checkpoints=[CheckpointInfo(0, False)]) == [0]


def test_operator_rewind_ignores_the_budget() -> None:
    guard = warmed(num_steps=1000, rewind_max_rewinds=0)
    verdict = guard.request_rewind(1000, onset_step=990, reason="operator: elasticctl rewind")
    plan = guard.plan_rewind(verdict, trigger_step=1000, checkpoints=CHECKPOINTS)
    assert isinstance(plan, RewindPlan) and plan.to_step == 800


def test_replay_after_rewind_is_armed_at_once() -> None:
    """Pre-onset statistics survive a rewind: no second warmup, a spike is caught at once."""
    guard = warmed(num_steps=1000)
    plan = _rewind_at(guard, 1000, checkpoints=CHECKPOINTS)
    assert isinstance(plan, RewindPlan) and guard.state is GuardState.OK
    spike = _observe_spike(guard, 900)
    assert spike.action is Action.SKIP_STEP


def test_record_rewind_out_of_order_is_refused() -> None:
    guard = warmed()
    plan = RewindPlan(0, 10, 20, "reshuffle", (0, 21), 1.0, 0, ())
    with pytest.raises(GuardStateError):
        guard.record_rewind(plan)
    with pytest.raises(GuardStateError):
        guard.plan_rewind(Verdict(Action.REWIND, (), 10, "nan"), trigger_step=20, checkpoints=[])


def test_promotion_waits_for_good_after_steps_healthy_steps() -> None:
    guard = warmed(num_steps=100)  # steps 0..99
    ckpts = [CheckpointInfo(0, True), CheckpointInfo(50, False), CheckpointInfo(75, False)]
    assert guard.promotions(step=99, checkpoints=ckpts) == []
    feed(guard, healthy_curve(seed=0, num_steps=1, start_step=100))
    assert guard.promotions(step=100, checkpoints=ckpts) == [50]
    feed(guard, healthy_curve(seed=0, num_steps=25, start_step=101))  # .. 125
    assert guard.promotions(step=125, checkpoints=ckpts) == [50, 75]


def test_no_promotion_while_an_episode_is_open_nor_across_an_anomaly() -> None:
    guard = warmed(num_steps=200)
    ckpts = [CheckpointInfo(150, False), CheckpointInfo(250, False), CheckpointInfo(300, False)]
    _nan(guard, 200)
    feed(guard, healthy_curve(seed=0, num_steps=49, start_step=201))  # .. 249: still open
    assert guard.state is GuardState.WATCHING
    assert guard.promotions(step=249, checkpoints=ckpts) == []
    feed(guard, healthy_curve(seed=0, num_steps=51, start_step=250))  # .. 300: closed
    assert guard.state is GuardState.OK
    # 150 saw the anomaly at 200 after it: never promoted; 250 is clean and old enough.
    assert guard.promotions(step=300, checkpoints=ckpts) == [250]


def test_promotion_after_rewind_restarts_at_the_target() -> None:
    guard = warmed(num_steps=1000)
    plan = _rewind_at(guard, 1000, checkpoints=CHECKPOINTS)
    assert isinstance(plan, RewindPlan)
    feed(guard, healthy_curve(seed=0, num_steps=60, start_step=900))  # .. 959
    ckpts = [CheckpointInfo(900, True), CheckpointInfo(950, False), CheckpointInfo(850, False)]
    assert guard.promotions(step=959, checkpoints=ckpts) == []
    feed(guard, healthy_curve(seed=0, num_steps=41, start_step=960))  # .. 1000
    assert guard.promotions(step=1000, checkpoints=ckpts) == [950]
