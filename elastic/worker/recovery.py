"""Recovery bookkeeping of a run: the guard, the run ledger and the committed checkpoints.

One object per worker that answers the questions a rewind raises, without doing the I/O of
moving state itself (:class:`elastic.worker.run.Run` saves and loads):

- is this step healthy (:meth:`Recovery.observe`), and if not, where does the run go back to
  (:meth:`Recovery.plan`, :meth:`Recovery.operator_plan`);
- which data window is reshuffled or skipped on the way (the run ledger, persisted beside the
  checkpoints at every rewind so a replay killed half-way still knows it);
- which committed checkpoints exist and which are known-good (promoted after enough healthy
  steps), and what goes into each manifest's ``meta`` to continue exactly after a restart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from elastic.checkpoint.manifest import Manifest
from elastic.checkpoint.retention import RewindHorizon
from elastic.checkpoint.storage import Storage
from elastic.guard import (
    Action,
    CheckpointInfo,
    GiveUp,
    Guard,
    GuardConfig,
    RewindConfig,
    RewindPlan,
    Verdict,
    promotion_horizon_steps,
    rewind_lookback_steps,
)
from elastic.worker.ledger import DataLedger, RunLedger


@dataclass(frozen=True)
class RunFiles:
    """Files of one run beside its checkpoints, under ``<checkpoint.url>/<run_id>/``.

    The ledger and the fault firing records are per run: runs sharing a ``checkpoint.url``
    must never read each other's data decisions or fault counts.
    """

    storage: Storage
    run_id: str

    def exists(self, rel: str) -> bool:
        return self.storage.exists(f"{self.run_id}/{rel}")

    def read_bytes(self, rel: str) -> bytes:
        return self.storage.read_bytes(f"{self.run_id}/{rel}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.storage.write_bytes(f"{self.run_id}/{rel}", data)


def rewind_horizon(guard: GuardConfig, rewind: RewindConfig) -> RewindHorizon:
    """What checkpoint retention must keep for this guard: every checkpoint it may still
    rewind to or promote to known-good (the manager never deletes those)."""
    return RewindHorizon(
        target_lookback_steps=rewind_lookback_steps(rewind=rewind, guard=guard),
        promotion_steps=promotion_horizon_steps(rewind=rewind, guard=guard),
    )


class Recovery:
    def __init__(
        self,
        guard_config: GuardConfig,
        rewind_config: RewindConfig,
        *,
        files: RunFiles,
        is_main: bool,
    ) -> None:
        self._guard_config = guard_config
        self._rewind_config = rewind_config
        self._files = files
        self._is_main = is_main
        self.guard = Guard(guard_config, rewind_config)
        self.ledger = RunLedger()
        self.committed: dict[int, bool] = {}  # step -> known good
        self._data: tuple[tuple[int, int], DataLedger] | None = None  # (ledger id, entries)

    @property
    def data(self) -> DataLedger:
        """The data decisions samplers read (reshuffled and skipped windows): the same object
        until a rewind or a restore changes them (samplers call this every step)."""
        key = (id(self.ledger), len(self.ledger.data_entries))
        if self._data is None or self._data[0] != key:
            self._data = (key, self.ledger.data)
        return self._data[1]

    # ----------------------------------------------------------------- per step
    def observe(self, step: int, *, loss: float, grad_norm: float, finite: bool) -> Verdict:
        return self.guard.observe(step, loss=loss, grad_norm=grad_norm, finite=finite)

    def lr_scale(self, step: int) -> float:
        return self.guard.lr_scale(step)

    def data_changed(self) -> None:
        """A planned change of data (a new stage), not a divergence: warm up again."""
        self.guard.reset_statistics()

    def record_anomaly(self, step: int, verdict: Verdict) -> None:
        self.ledger.record(
            "divergence",
            step=step,
            kind=verdict.kind,
            action=verdict.action.value,
            onset_step=verdict.onset_step,
        )

    # ----------------------------------------------------------------- rewinds
    def plan(self, verdict: Verdict, *, trigger_step: int) -> RewindPlan | GiveUp:
        """Where a ``rewind`` verdict goes (a GiveUp when the budget or history is spent)."""
        assert verdict.action is Action.REWIND
        return self.guard.plan_rewind(
            verdict, trigger_step=trigger_step, checkpoints=self._checkpoints()
        )

    def operator_plan(self, to_step: int, *, trigger_step: int) -> RewindPlan | None:
        """An operator's rewind to the committed checkpoint ``to_step`` (None: no such one)."""
        if to_step not in self.committed:
            return None
        reason = f"operator request: rewind to step {to_step}"
        self.guard.request_rewind(trigger_step, onset_step=to_step + 1, reason=reason)
        rewind = self._rewind_config
        return RewindPlan(
            to_step=to_step,
            onset_step=to_step + 1,
            trigger_step=trigger_step,
            data_action=rewind.data,
            window=(to_step + 1, trigger_step + 1),
            lr_multiplier=rewind.lr_multiplier,
            lr_multiplier_steps=rewind.lr_multiplier_steps,
            reasons=(reason,),
            index=len(self.guard.history),
        )

    def rewind(self, plan: RewindPlan) -> dict[str, Any]:
        """Book the rewind (data window, guard history, ledger file); returns its details.

        The caller retires the checkpoints after ``plan.to_step`` and loads that one.
        """
        window = (plan.to_step + 1, plan.trigger_step + 1)
        self.ledger.add_data_action(plan.data_action, *window)
        self.guard.record_rewind(plan)
        self.committed = {s: g for s, g in self.committed.items() if s <= plan.to_step}
        details = {
            "to_step": plan.to_step,
            "onset_step": plan.onset_step,
            "trigger_step": plan.trigger_step,
            "data_action": plan.data_action,
            "window": list(window),
            "lr_multiplier": plan.lr_multiplier,
            "reasons": list(plan.reasons),
        }
        self.ledger.record("rewind", step=plan.trigger_step, **details)
        self.ledger.at_step = plan.to_step
        self._write_ledger()
        return details

    def restart_from(self, step: int) -> dict[str, Any]:
        """Book an operator's restart of a diverged run from ``step`` (already loaded): the
        checkpoints after it are gone, the guard starts over with a fresh budget (the operator
        decided), the data ledger is kept. Returns the rewind event's details."""
        self.guard = Guard(self._guard_config, self._rewind_config)
        self.committed = {s: good for s, good in self.committed.items() if s <= step}
        details = {"to_step": step, "kind": "operator", "reason": "restart after diverged"}
        self.ledger.record("restart", step=step, reason=details["reason"])
        self.ledger.at_step = step
        self._write_ledger()
        return details

    def give_up(self, step: int, reasons: Sequence[str]) -> None:
        self.ledger.record("diverged", step=step, reasons=list(reasons))
        self._write_ledger()

    # ----------------------------------------------------------------- checkpoints
    def saved(self, step: int) -> None:
        self.committed[step] = False

    def promotions(self, step: int) -> list[int]:
        """Checkpoints that became known-good after ``step`` (now marked so here)."""
        steps = self.guard.promotions(step=step, checkpoints=self._checkpoints())
        for promoted in steps:
            self.committed[promoted] = True
        return steps

    def meta(self, *, last_loss: float) -> dict[str, Any]:
        """What every manifest carries for an exact continuation."""
        return {
            "ledger": self.ledger.to_json(),
            "guard": self.guard.state_dict(),
            "health": {
                "loss": last_loss if math.isfinite(last_loss) else None,
                "guard_state": str(self.guard.state.value),
            },
        }

    def adopt(self, manifest: Manifest | None, *, listed: Iterable[Manifest]) -> None:
        """Continue from ``manifest`` (None: a fresh run): ledger, guard, committed steps."""
        step = manifest.step if manifest is not None else 0
        if manifest is not None:
            meta = manifest.meta
            saved = RunLedger.from_json(meta.get("ledger"))
            stored = RunLedger.from_json(self._read_ledger())
            self.ledger = saved.merged(stored)
            guard_state = meta.get("guard")
            if stored.at_step is not None and stored.at_step >= step and stored.guard is not None:
                guard_state = stored.guard  # a rewind happened after this checkpoint was saved
            self.guard = Guard(self._guard_config, self._rewind_config, state=guard_state)
        self.committed = {m.step: m.known_good for m in listed if m.step <= step}

    def _checkpoints(self) -> list[CheckpointInfo]:
        return [CheckpointInfo(s, good) for s, good in sorted(self.committed.items())]

    def _write_ledger(self) -> None:
        self.ledger.guard = self.guard.state_dict()
        if self._is_main:
            self._files.write_bytes(RunLedger.FILE, self.ledger.dumps())

    def _read_ledger(self) -> dict[str, Any] | None:
        if not self._files.exists(RunLedger.FILE):
            return None
        return RunLedger.loads(self._files.read_bytes(RunLedger.FILE))
