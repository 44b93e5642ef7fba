"""Determinism, persistence, false positives on healthy curves, and the cost of observe()."""

from __future__ import annotations

import json
import random
import time

import pytest

from elastic.guard import (
    Action,
    CheckpointInfo,
    Guard,
    GuardConfig,
    GuardStateInvalid,
    RewindConfig,
    RewindPlan,
    Verdict,
)
from tests.elastic.guard.curves import Point, healthy_curve, lr_blowup
from tests.elastic.guard.helpers import feed, make_guard

CHECKPOINTS = [CheckpointInfo(step, known_good=True) for step in range(0, 2000, 100)]


def _troubled_run(seed: int) -> list[Point]:
    """Healthy with random spikes, NaN pairs and an lr blow-up: every branch gets visited."""
    rng = random.Random(seed)
    points = lr_blowup(healthy_curve(seed=seed, num_steps=1400), start_step=1250)
    out = []
    for p in points:
        roll = rng.random()
        if roll < 0.02:
            out.append(Point(p.step, p.loss * 3.0, p.grad_norm))
        elif roll < 0.025:
            out.append(Point(p.step, float("nan"), p.grad_norm))
        else:
            out.append(p)
    return out


def _drive(guard: Guard, points: list[Point], *, restore_every: int = 0) -> list[Verdict]:
    """Observe ``points`` (rewinds planned and recorded, replay skipped for brevity).

    With ``restore_every``, the guard is rebuilt from a JSON round trip of its state every
    that many steps, as a restarted trainer would.
    """
    verdicts = []
    for i, p in enumerate(points):
        if restore_every and i % restore_every == 0:
            blob = json.dumps(guard.state_dict(), allow_nan=False)
            guard = Guard(guard.guard_config, guard.rewind_config, state=json.loads(blob))
        finite = p.loss == p.loss
        verdict = guard.observe(p.step, loss=p.loss, grad_norm=p.grad_norm, finite=finite)
        verdicts.append(verdict)
        if verdict.action is Action.REWIND:
            plan = guard.plan_rewind(verdict, trigger_step=p.step, checkpoints=CHECKPOINTS)
            verdicts.append(Verdict(Action.OK, (repr(plan),)))
            if isinstance(plan, RewindPlan):
                guard.record_rewind(plan)
        promoted = guard.promotions(step=p.step, checkpoints=CHECKPOINTS[:3])
        verdicts.append(Verdict(Action.OK, tuple(map(str, promoted))))
    return verdicts


@pytest.mark.parametrize("seed", [0, 1])
def test_same_inputs_give_identical_verdicts(seed: int) -> None:
    points = _troubled_run(seed)
    first = _drive(make_guard(), points)
    second = _drive(make_guard(), points)
    assert first == second
    assert {v.action for v in first} >= {Action.OK, Action.SKIP_STEP, Action.REWIND}


@pytest.mark.parametrize("seed", [0, 1])
def test_state_dict_round_trip_gives_identical_future_verdicts(seed: int) -> None:
    points = _troubled_run(seed)
    straight = _drive(make_guard(), points)
    restored = _drive(make_guard(), points, restore_every=7)
    assert straight == restored


def test_state_dict_is_plain_json() -> None:
    guard = make_guard()
    _drive(guard, _troubled_run(0)[:300])
    blob = json.dumps(guard.state_dict(), allow_nan=False, sort_keys=True)
    assert json.loads(blob) == guard.state_dict()


def test_bad_state_is_refused() -> None:
    with pytest.raises(GuardStateInvalid, match="version"):
        Guard(GuardConfig(), RewindConfig(), state={"version": 99})
    state = make_guard().state_dict()
    state["state"] = "confused"
    with pytest.raises(GuardStateInvalid):
        Guard(GuardConfig(), RewindConfig(), state=state)


@pytest.mark.parametrize("loss_noise", [0.01, 0.02, 0.03])
def test_healthy_curves_never_rewind_and_rarely_skip(loss_noise: float) -> None:
    """1,000-step decaying, noisy curves over 5 seeds: no rewind, < 0.5% of steps skipped."""
    for seed in range(5):
        for rising_grad in (False, True):
            points = healthy_curve(
                seed=seed, num_steps=1000, loss_noise=loss_noise, grad_sigma=0.25
            )
            if rising_grad:  # grad norm creeping up late in training must not look like a spike
                points = [Point(p.step, p.loss, p.grad_norm * (1 + p.step / 500)) for p in points]
            verdicts = feed(make_guard(), points, stop=False)
            actions = [v.action for v in verdicts]
            assert Action.REWIND not in actions and Action.GIVE_UP not in actions
            assert actions.count(Action.SKIP_STEP) < 0.005 * len(points), (seed, rising_grad)


def test_observe_costs_well_under_a_millisecond() -> None:
    points = healthy_curve(seed=0, num_steps=3000)
    guard = make_guard()
    start = time.perf_counter()
    feed(guard, points, stop=False)
    per_call_us = (time.perf_counter() - start) / len(points) * 1e6
    print(f"observe(): {per_call_us:.1f} us per call (window 128)")
    assert per_call_us < 1000.0


def test_pending_rewind_survives_a_round_trip() -> None:
    guard = make_guard()
    feed(guard, healthy_curve(seed=0, num_steps=300))
    guard.observe(300, loss=float("nan"), grad_norm=1.0, finite=False)
    verdict = guard.observe(301, loss=float("nan"), grad_norm=1.0, finite=False)
    assert verdict.action is Action.REWIND
    restored = Guard(
        GuardConfig(), RewindConfig(), state=json.loads(json.dumps(guard.state_dict()))
    )
    assert restored.state == guard.state
    assert restored.plan_rewind(
        verdict, trigger_step=301, checkpoints=CHECKPOINTS
    ) == guard.plan_rewind(verdict, trigger_step=301, checkpoints=CHECKPOINTS)


@pytest.mark.parametrize("seed", range(6))
def test_onset_never_lies_further_back_than_the_documented_lag(seed: int) -> None:
    """Checkpoint retention (rewind_lookback_steps) relies on trigger - onset <= max_onset_lag."""
    config = GuardConfig()
    guard = Guard(config, RewindConfig(max_rewinds=1000))
    lags = []
    for p in _troubled_run(seed):
        verdict = guard.observe(p.step, loss=p.loss, grad_norm=p.grad_norm, finite=p.loss == p.loss)
        if verdict.action is Action.REWIND:
            assert verdict.onset_step is not None
            lags.append(p.step - verdict.onset_step)
            plan = guard.plan_rewind(verdict, trigger_step=p.step, checkpoints=CHECKPOINTS)
            assert isinstance(plan, RewindPlan)
            guard.record_rewind(plan)
    assert lags and max(lags) <= config.max_onset_lag_steps
