"""Pure rewind planning: the target checkpoint, the data window, the budget, promotions.

Functions of their arguments only (no guard object), so each rule is testable on its own and
``policy.Guard`` is left with state keeping. Checkpoint lists may come in any order and with
duplicates; every choice is a max/min over steps, so the order never changes a result.
"""

from __future__ import annotations

from collections.abc import Sequence

from elastic.guard.config import DataAction, RewindConfig
from elastic.guard.verdicts import CheckpointInfo, GiveUp, Kind, RewindPlan


def budget_exhausted(
    history: Sequence[RewindPlan], *, trigger_step: int, config: RewindConfig
) -> str | None:
    """The give-up reason when ``max_rewinds`` rewinds already triggered within the budget window.

    A past rewind counts when its trigger lies after ``trigger_step - budget_window_steps``,
    including triggers *later* than this one (a replay re-reaching old step numbers is not
    progress).
    """
    since = trigger_step - config.budget_window_steps
    used = sum(1 for plan in history if plan.trigger_step > since)
    if used < config.max_rewinds:
        return None
    return (
        f"diverged: rewind budget spent: {used} rewinds triggered within "
        f"{config.budget_window_steps} steps of step {trigger_step} "
        f"(rewind.max_rewinds={config.max_rewinds}, "
        f"rewind.budget_window_steps={config.budget_window_steps})"
    )


def choose_target(
    checkpoints: Sequence[CheckpointInfo], *, onset_step: int, min_steps_back: int
) -> tuple[int | None, tuple[str, ...]]:
    """The rewind target step and why; ``None`` when no known-good checkpoint predates the onset.

    First choice: the newest known-good checkpoint at least ``min_steps_back`` before the onset.
    Fallback: the newest known-good checkpoint before the onset at all (early in a run nothing
    is old enough yet; a known-good checkpoint already had ``good_after_steps`` healthy steps
    after it, and a failed retry costs one rewind from the budget, not the run).
    """
    good = [c.step for c in checkpoints if c.known_good]
    limit = onset_step - min_steps_back
    far = [s for s in good if s <= limit]
    if far:
        to_step = max(far)
        return to_step, (
            f"rewind to known-good checkpoint step {to_step}, {onset_step - to_step} steps "
            f"before onset step {onset_step} (rewind.min_steps_back={min_steps_back})",
        )
    near = [s for s in good if s < onset_step]
    if near:
        to_step = max(near)
        return to_step, (
            f"no known-good checkpoint >= {min_steps_back} steps before onset step "
            f"{onset_step} (rewind.min_steps_back); falling back to the newest known-good "
            f"checkpoint before the onset, step {to_step} ({onset_step - to_step} steps back)",
        )
    return None, (f"diverged: no known-good checkpoint before onset step {onset_step}",)


def choose_data_action(
    history: Sequence[RewindPlan], *, onset_step: int, default: DataAction
) -> tuple[DataAction, tuple[str, ...]]:
    """``skip`` when the onset falls in a window an earlier rewind already replayed."""
    for plan in history:
        start, end = plan.window
        if start <= onset_step < end:
            return "skip", (
                f"onset step {onset_step} lies in window [{start}, {end}) already "
                f"{'reshuffled' if plan.data_action == 'reshuffle' else 'skipped'} by rewind "
                f"{plan.index}: skipping this window's data permanently",
            )
    return default, ()


def plan_rewind(
    *,
    onset_step: int,
    trigger_step: int,
    kind: str | None,
    reasons: tuple[str, ...],
    checkpoints: Sequence[CheckpointInfo],
    history: Sequence[RewindPlan],
    config: RewindConfig,
) -> RewindPlan | GiveUp:
    """The whole rewind decision for one trigger (operator rewinds skip the budget)."""
    if kind != Kind.OPERATOR.value:
        spent = budget_exhausted(history, trigger_step=trigger_step, config=config)
        if spent is not None:
            return GiveUp(reasons=(*reasons, spent))
    to_step, target_reasons = choose_target(
        checkpoints, onset_step=onset_step, min_steps_back=config.min_steps_back
    )
    if to_step is None:
        return GiveUp(reasons=(*reasons, *target_reasons))
    data_action, data_reasons = choose_data_action(
        history, onset_step=onset_step, default=config.data
    )
    return RewindPlan(
        to_step=to_step,
        onset_step=onset_step,
        trigger_step=trigger_step,
        data_action=data_action,
        window=(to_step, trigger_step + 1),
        lr_multiplier=config.lr_multiplier,
        lr_multiplier_steps=config.lr_multiplier_steps,
        reasons=(*reasons, *target_reasons, *data_reasons),
        index=len(history),
    )


def promotable(
    *,
    step: int,
    checkpoints: Sequence[CheckpointInfo],
    good_after_steps: int,
    clean_since: int | None,
) -> list[int]:
    """Steps of checkpoints to mark known-good now, ascending.

    ``clean_since``: every step observed on the current timeline from there to ``step`` was
    healthy and no episode is open (``None``: not the case). A checkpoint qualifies when it is
    not known-good yet, lies in that clean stretch and ``step - checkpoint >= good_after_steps``.
    """
    if clean_since is None:
        return []
    return sorted(
        {
            c.step
            for c in checkpoints
            if not c.known_good and clean_since <= c.step <= step - good_after_steps
        }
    )
