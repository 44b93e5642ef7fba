"""Driving a Guard through curves in tests."""

from __future__ import annotations

from collections.abc import Iterable

from elastic.guard import Action, Guard, GuardConfig, RewindConfig, Verdict
from elastic.guard.detector import robust_stats
from tests.elastic.guard.curves import Point, healthy_curve


def make_guard(**overrides: object) -> Guard:
    """A guard with default configs; ``rewind_<key>`` overrides go to RewindConfig."""
    guard_kw = {k: v for k, v in overrides.items() if not k.startswith("rewind_")}
    rewind_kw = {k[len("rewind_") :]: v for k, v in overrides.items() if k.startswith("rewind_")}
    return Guard(GuardConfig(**guard_kw), RewindConfig(**rewind_kw))  # type: ignore[arg-type]


def feed(guard: Guard, points: Iterable[Point], *, stop: bool = True) -> list[Verdict]:
    """Observe every point; with ``stop``, end at the first rewind or give-up."""
    verdicts = []
    for p in points:
        verdict = guard.observe(p.step, loss=p.loss, grad_norm=p.grad_norm, finite=True)
        verdicts.append(verdict)
        if stop and verdict.action in (Action.REWIND, Action.GIVE_UP):
            break
    return verdicts


def warmed(*, num_steps: int = 200, seed: int = 0, **overrides: object) -> Guard:
    """A guard that has seen ``num_steps`` healthy steps (0 .. num_steps-1)."""
    guard = make_guard(**overrides)
    verdicts = feed(guard, healthy_curve(seed=seed, num_steps=num_steps))
    assert all(v.action is Action.OK for v in verdicts)
    return guard


def sigma_spike(guard: Guard, *, sigmas: float, field: int = 1) -> float:
    """The value ``sigmas`` robust sigma above the window median (field 1 loss, 2 grad norm)."""
    samples = guard.state_dict()["samples"]
    stats = robust_stats(
        (s[field] for s in samples), floor_fraction=guard.guard_config.scale_floor_fraction
    )
    return stats.median + sigmas * stats.sigma


def healthy_at(step: int, *, seed: int = 0) -> Point:
    """The healthy curve's point for ``step`` (as if the run had gone on)."""
    return healthy_curve(seed=seed, num_steps=1, start_step=step)[0]
