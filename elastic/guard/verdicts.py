"""The guard's vocabulary: verdicts, states, checkpoints it is told about, rewind plans.

Plain frozen values so the trainer can log them, compare them across ranks and persist the
rewind history (``plan_to_dict`` / ``plan_from_dict``) in JSON.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from elastic.guard.config import DATA_ACTIONS, DataAction


class Action(enum.StrEnum):
    """What the trainer does with the step it asked about."""

    OK = "ok"  # apply the update
    SKIP_STEP = "skip_step"  # drop this update (zero grads), go on with the next step
    REWIND = "rewind"  # drop this update, plan_rewind(), load the target, record_rewind()
    GIVE_UP = "give_up"  # drop this update and stop the run as `diverged`


class GuardState(enum.StrEnum):
    """Where the guard stands; transitions are listed in docs/guard.md.

    ok -> watching (an anomaly) -> ok (``episode_window_steps`` quiet steps)
    ok | watching -> rewinding (escalation) -> ok (``record_rewind``) | diverged (no plan)
    ok | watching -> diverged (escalation with the budget spent or rewinds disabled)
    diverged is terminal.
    """

    OK = "ok"
    WATCHING = "watching"
    REWINDING = "rewinding"
    DIVERGED = "diverged"


class Kind(enum.StrEnum):
    """What was anomalous about a step (the ``kind`` of a verdict)."""

    NAN = "nan"
    LOSS_SPIKE = "loss_spike"
    GRAD_SPIKE = "grad_spike"
    SUSTAINED = "sustained"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Verdict:
    """The answer for one step. ``onset_step``: first anomalous step of the open episode."""

    action: Action
    reasons: tuple[str, ...] = ()
    onset_step: int | None = None
    kind: str | None = None
    loss_z: float | None = None
    grad_z: float | None = None

    @property
    def applies_update(self) -> bool:
        return self.action is Action.OK


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: the state before global step ``step`` runs."""

    step: int
    known_good: bool


@dataclass(frozen=True)
class RewindPlan:
    """Where to go and what to do with the data of ``window`` (start inclusive, end exclusive).

    ``index`` counts the run's rewinds from 0: a distinct salt for a reshuffled window.
    """

    to_step: int
    onset_step: int
    trigger_step: int
    data_action: DataAction
    window: tuple[int, int]
    lr_multiplier: float
    lr_multiplier_steps: int
    reasons: tuple[str, ...]
    index: int = 0


@dataclass(frozen=True)
class GiveUp:
    """No rewind is possible or allowed; the run stops as ``diverged``."""

    reasons: tuple[str, ...]


def plan_to_dict(plan: RewindPlan) -> dict[str, Any]:
    return {
        "index": plan.index,
        "to_step": plan.to_step,
        "onset_step": plan.onset_step,
        "trigger_step": plan.trigger_step,
        "data_action": plan.data_action,
        "window": [plan.window[0], plan.window[1]],
        "lr_multiplier": plan.lr_multiplier,
        "lr_multiplier_steps": plan.lr_multiplier_steps,
        "reasons": list(plan.reasons),
    }


def plan_from_dict(data: Mapping[str, Any]) -> RewindPlan:
    """Inverse of :func:`plan_to_dict`; raises ``KeyError`` / ``ValueError`` / ``TypeError``."""
    start, end = (int(v) for v in data["window"])
    action = str(data["data_action"])
    if action not in DATA_ACTIONS:
        raise ValueError(f"data_action={action!r}: must be one of {', '.join(DATA_ACTIONS)}")
    return RewindPlan(
        to_step=int(data["to_step"]),
        onset_step=int(data["onset_step"]),
        trigger_step=int(data["trigger_step"]),
        data_action=cast(DataAction, action),
        window=(start, end),
        lr_multiplier=float(data["lr_multiplier"]),
        lr_multiplier_steps=int(data["lr_multiplier_steps"]),
        reasons=tuple(str(r) for r in data["reasons"]),
        index=int(data["index"]),
    )
