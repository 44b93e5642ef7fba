"""The guard: per-step verdicts, escalation to a rewind, the rewind history, persistence.

``Guard.observe()`` is called on every rank, once per optimizer step before
``optimizer.step()``, with the already all-reduced loss and grad norm, so every rank reaches the
same verdict without talking. The guard keeps no clock, no randomness and no unordered
containers; the same inputs in the same order give the same verdicts, bit for bit, also after a
``state_dict()`` -> JSON -> ``Guard(state=...)`` round trip.

Escalation (thresholds in ``GuardConfig``):

- non-finite loss or grad norm -> ``skip_step`` (kind ``nan``); detection is active from step 1.
- loss or grad norm z > ``z_threshold`` (after warmup) -> ``skip_step`` (``loss_spike`` /
  ``grad_spike``); the step stays out of the statistics.
- ``skips_to_rewind`` skips within ``skip_window_steps``, ``nonfinite_to_rewind`` non-finite
  steps within ``nonfinite_window_steps``, or the loss average elevated for ``sustained_steps``
  -> ``rewind``; with the budget spent or rewinds disabled -> ``give_up``.

The onset of a rewind is the first anomalous step of the open episode: the oldest anomaly still
inside ``episode_window_steps`` of the trigger, or the start of the elevated stretch.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from elastic.guard import planning
from elastic.guard.config import GuardConfig, RewindConfig
from elastic.guard.detector import LossAverage, Reading, RollingWindow, Sample
from elastic.guard.errors import GuardStateError, GuardStateInvalid
from elastic.guard.verdicts import (
    Action,
    CheckpointInfo,
    GiveUp,
    GuardState,
    Kind,
    RewindPlan,
    Verdict,
    plan_from_dict,
    plan_to_dict,
)

STATE_VERSION = 1


class Guard:
    """Divergence detection and rewind policy for one run (see the module docstring)."""

    def __init__(
        self, guard: GuardConfig, rewind: RewindConfig, *, state: Mapping[str, Any] | None = None
    ) -> None:
        self.guard_config = guard
        self.rewind_config = rewind
        self._window = RollingWindow(
            window_steps=guard.window_steps, floor_fraction=guard.scale_floor_fraction
        )
        self._average = LossAverage(ema_steps=guard.ema_steps)
        # (step, kind) of skipped steps inside episode_window_steps of the last observed step.
        self._anomalies: deque[tuple[int, str]] = deque()
        self._last_anomaly_step: int | None = None
        self._timeline_start: int | None = None
        self._state = GuardState.OK
        self._pending: tuple[int, int, str] | None = None  # (onset, trigger, kind)
        self._give_up_reasons: tuple[str, ...] = ()
        self._history: list[RewindPlan] = []
        if state is not None:
            self._load(state)

    # ----- queries -------------------------------------------------------------------------

    @property
    def state(self) -> GuardState:
        return self._state

    @property
    def history(self) -> tuple[RewindPlan, ...]:
        """Every rewind recorded in this run, oldest first (the data windows the sampler needs)."""
        return tuple(self._history)

    def episode_onset(self) -> int | None:
        """First anomalous step of the open episode (``None`` when none is open)."""
        steps = [s for s, _ in self._anomalies]
        if self._average.elevated_since is not None:
            steps.append(self._average.elevated_since)
        return min(steps) if steps else None

    def lr_scale(self, step: int) -> float:
        """Learning-rate multiplier for ``step``: the last rewind's, inside its range, else 1."""
        if not self._history:
            return 1.0
        last = self._history[-1]
        if last.to_step <= step < last.to_step + last.lr_multiplier_steps:
            return last.lr_multiplier
        return 1.0

    # ----- per step ------------------------------------------------------------------------

    def observe(self, step: int, *, loss: float, grad_norm: float, finite: bool) -> Verdict:
        """The verdict for ``step`` (call before ``optimizer.step()``, with reduced values)."""
        if not self.guard_config.enabled:
            return Verdict(Action.OK)
        if self._state is GuardState.DIVERGED:
            return Verdict(Action.GIVE_UP, self._give_up_reasons, kind=None)
        if self._state is GuardState.REWINDING:
            raise GuardStateError(
                f"observe(step={step}) while a rewind is pending: call plan_rewind() and "
                "record_rewind() first"
            )
        if self._timeline_start is None:
            self._timeline_start = step
        self._forget_before(step)
        loss, grad_norm = float(loss), float(grad_norm)
        if not (finite and math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = f"non-finite loss or gradient (loss={loss!r}, grad_norm={grad_norm!r})"
            return self._on_anomaly(step, Kind.NAN, (reason,), None)
        reading = self._window.read(
            loss=loss, grad_norm=grad_norm, warmup_steps=self.guard_config.warmup_steps
        )
        spike = self._spike(loss, grad_norm, reading)
        if spike is not None:
            return self._on_anomaly(step, spike[0], spike[1], reading)
        return self._on_healthy(Sample(step, loss, grad_norm), reading)

    def request_rewind(self, step: int, *, onset_step: int, reason: str) -> Verdict:
        """An operator's rewind (``elasticctl rewind``): a ``rewind`` verdict outside the budget."""
        if self._state in (GuardState.REWINDING, GuardState.DIVERGED):
            raise GuardStateError(f"request_rewind() in state {self._state.value}")
        if onset_step > step:
            raise ValueError(f"onset_step={onset_step}: must be <= step ({step})")
        self._state = GuardState.REWINDING
        self._pending = (onset_step, step, Kind.OPERATOR.value)
        return Verdict(Action.REWIND, (reason,), onset_step, Kind.OPERATOR.value)

    def _spike(
        self, loss: float, grad_norm: float, reading: Reading
    ) -> tuple[Kind, tuple[str, ...]] | None:
        if not reading.armed:
            return None
        threshold = self.guard_config.z_threshold
        found: list[tuple[Kind, str]] = []
        for kind, name, value, stats, z in (
            (Kind.LOSS_SPIKE, "loss", loss, reading.loss, reading.loss_z),
            (Kind.GRAD_SPIKE, "grad norm", grad_norm, reading.grad_norm, reading.grad_z),
        ):
            if stats is not None and z is not None and z > threshold:
                found.append(
                    (
                        kind,
                        f"{name} {value:.6g} is {z:.1f} robust sigma above the window median "
                        f"{stats.median:.6g} (guard.z_threshold={threshold:g})",
                    )
                )
        if not found:
            return None
        return found[0][0], tuple(text for _, text in found)

    def _on_anomaly(
        self, step: int, kind: Kind, reasons: tuple[str, ...], reading: Reading | None
    ) -> Verdict:
        self._anomalies.append((step, kind.value))
        self._mark_anomalous(step)
        repeated = self._repeated(step)
        if repeated is not None:
            return self._escalate(step, kind, (*reasons, repeated), reading)
        sustained = self._sustained(step)
        if sustained is not None:
            return self._escalate(step, Kind.SUSTAINED, (*reasons, sustained), reading)
        self._state = GuardState.WATCHING
        return self._verdict(Action.SKIP_STEP, reasons, self.episode_onset(), kind, reading)

    def _on_healthy(self, sample: Sample, reading: Reading) -> Verdict:
        self._window.add(sample)
        self._average.update(sample.loss)
        cfg = self.guard_config
        if cfg.sustained_steps > 0 and reading.loss is not None:
            baseline = reading.loss.median
            if self._average.judge(sample.step, baseline=baseline, ratio=cfg.sustained_ratio):
                self._mark_anomalous(sample.step)
        sustained = self._sustained(sample.step)
        if sustained is not None:
            return self._escalate(sample.step, Kind.SUSTAINED, (sustained,), reading)
        self._state = GuardState.OK if self.episode_onset() is None else GuardState.WATCHING
        return self._verdict(Action.OK, (), None, None, reading)

    def _repeated(self, step: int) -> str | None:
        cfg = self.guard_config
        nonfinite = sum(
            1
            for s, k in self._anomalies
            if k == Kind.NAN.value and s > step - cfg.nonfinite_window_steps
        )
        if nonfinite >= cfg.nonfinite_to_rewind:
            return (
                f"{nonfinite} non-finite steps within {cfg.nonfinite_window_steps} steps "
                f"(guard.nonfinite_to_rewind={cfg.nonfinite_to_rewind})"
            )
        skips = sum(1 for s, _ in self._anomalies if s > step - cfg.skip_window_steps)
        if skips >= cfg.skips_to_rewind:
            return (
                f"{skips} skipped steps within {cfg.skip_window_steps} steps "
                f"(guard.skips_to_rewind={cfg.skips_to_rewind})"
            )
        return None

    def _sustained(self, step: int) -> str | None:
        cfg = self.guard_config
        since = self._average.elevated_since
        if cfg.sustained_steps == 0 or since is None or step - since + 1 < cfg.sustained_steps:
            return None
        return (
            f"loss moving average {self._average.value:.6g} above guard.sustained_ratio="
            f"{cfg.sustained_ratio:g} x the window median since step {since} "
            f"(guard.sustained_steps={cfg.sustained_steps})"
        )

    def _escalate(
        self, step: int, kind: Kind, reasons: tuple[str, ...], reading: Reading | None
    ) -> Verdict:
        onset = self.episode_onset()
        onset = step if onset is None else onset
        if not self.rewind_config.enabled:
            why = "diverged: escalation with rewinds disabled (rewind.enabled=false)"
            return self._give_up((*reasons, why), onset, kind, reading)
        spent = planning.budget_exhausted(
            self._history, trigger_step=step, config=self.rewind_config
        )
        if spent is not None:
            return self._give_up((*reasons, spent), onset, kind, reading)
        self._state = GuardState.REWINDING
        self._pending = (onset, step, kind.value)
        return self._verdict(Action.REWIND, reasons, onset, kind, reading)

    def _give_up(
        self, reasons: tuple[str, ...], onset: int, kind: Kind, reading: Reading | None
    ) -> Verdict:
        self._state = GuardState.DIVERGED
        self._give_up_reasons = reasons
        return self._verdict(Action.GIVE_UP, reasons, onset, kind, reading)

    @staticmethod
    def _verdict(
        action: Action,
        reasons: tuple[str, ...],
        onset: int | None,
        kind: Kind | None,
        reading: Reading | None,
    ) -> Verdict:
        return Verdict(
            action=action,
            reasons=reasons,
            onset_step=onset,
            kind=None if kind is None else kind.value,
            loss_z=None if reading is None else reading.loss_z,
            grad_z=None if reading is None else reading.grad_z,
        )

    def _mark_anomalous(self, step: int) -> None:
        last = self._last_anomaly_step
        self._last_anomaly_step = step if last is None else max(last, step)

    def _forget_before(self, step: int) -> None:
        horizon = step - self.guard_config.episode_window_steps
        while self._anomalies and self._anomalies[0][0] <= horizon:
            self._anomalies.popleft()

    # ----- rewinds -------------------------------------------------------------------------

    def plan_rewind(
        self, verdict: Verdict, *, trigger_step: int, checkpoints: Sequence[CheckpointInfo]
    ) -> RewindPlan | GiveUp:
        """Where the ``rewind`` verdict goes; a ``GiveUp`` puts the guard in ``diverged``."""
        if self._state is not GuardState.REWINDING or self._pending is None:
            raise GuardStateError(f"plan_rewind() in state {self._state.value}, not rewinding")
        if verdict.action is not Action.REWIND or verdict.onset_step is None:
            raise GuardStateError(f"plan_rewind() needs a rewind verdict, got {verdict.action}")
        result = planning.plan_rewind(
            onset_step=verdict.onset_step,
            trigger_step=trigger_step,
            kind=verdict.kind,
            reasons=verdict.reasons,
            checkpoints=checkpoints,
            history=self._history,
            config=self.rewind_config,
        )
        if isinstance(result, GiveUp):
            self._state = GuardState.DIVERGED
            self._give_up_reasons = result.reasons
            self._pending = None
        return result

    def record_rewind(self, plan: RewindPlan) -> None:
        """The trainer has rewound to ``plan.to_step``: restart detection from there.

        The window keeps its pre-onset samples (healthy history of this model, so no second
        warmup) and drops the episode's; the loss average restarts from the kept samples;
        anomaly counters clear; known-good promotion restarts at ``plan.to_step``.
        """
        if self._state is not GuardState.REWINDING:
            raise GuardStateError(f"record_rewind() in state {self._state.value}, not rewinding")
        self._history.append(plan)
        self._window.drop_from(plan.onset_step)
        self._average.reseed(self._window.recent_losses(self.guard_config.ema_steps))
        self._anomalies.clear()
        self._last_anomaly_step = None
        self._timeline_start = plan.to_step
        self._pending = None
        self._state = GuardState.OK

    def reset_statistics(self) -> None:
        """Forget the window and the loss average (e.g. at a data-stage switch); warmup again."""
        self._window.clear()
        self._average.reseed([])

    # ----- known-good checkpoints ----------------------------------------------------------

    def promotions(self, *, step: int, checkpoints: Sequence[CheckpointInfo]) -> list[int]:
        """Checkpoint steps to mark known-good after observing ``step`` (call every step)."""
        return planning.promotable(
            step=step,
            checkpoints=checkpoints,
            good_after_steps=self.rewind_config.good_after_steps,
            clean_since=self._clean_since(checkpoints),
        )

    def _clean_since(self, checkpoints: Sequence[CheckpointInfo]) -> int | None:
        if not self.guard_config.enabled:
            # Nothing is watched, so nothing counts against a checkpoint but its age.
            return min((c.step for c in checkpoints), default=None)
        if self._state is not GuardState.OK or self.episode_onset() is not None:
            return None
        if self._timeline_start is None or self._last_anomaly_step is None:
            return self._timeline_start
        return max(self._timeline_start, self._last_anomaly_step + 1)

    # ----- persistence ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; ``Guard(cfg, rewind, state=d)`` continues with identical verdicts."""
        pending = self._pending
        return {
            "version": STATE_VERSION,
            "state": self._state.value,
            "samples": [[s.step, s.loss, s.grad_norm] for s in self._window.samples()],
            "ema": self._average.value,
            "elevated_since": self._average.elevated_since,
            "anomalies": [[s, k] for s, k in self._anomalies],
            "last_anomaly_step": self._last_anomaly_step,
            "timeline_start": self._timeline_start,
            "pending": None if pending is None else list(pending),
            "give_up_reasons": list(self._give_up_reasons),
            "history": [plan_to_dict(p) for p in self._history],
        }

    def _load(self, data: Mapping[str, Any]) -> None:
        if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION:
            version = data.get("version") if isinstance(data, Mapping) else None
            raise GuardStateInvalid(f"guard state version={version!r}: expected {STATE_VERSION}")
        try:
            self._state = GuardState(data["state"])
            self._window = RollingWindow(
                window_steps=self.guard_config.window_steps,
                floor_fraction=self.guard_config.scale_floor_fraction,
                samples=(Sample(int(s), float(v), float(g)) for s, v, g in data["samples"]),
            )
            self._average = LossAverage(
                ema_steps=self.guard_config.ema_steps,
                value=_opt_float(data["ema"]),
                elevated_since=_opt_int(data["elevated_since"]),
            )
            self._anomalies = deque((int(s), Kind(k).value) for s, k in data["anomalies"])
            self._last_anomaly_step = _opt_int(data["last_anomaly_step"])
            self._timeline_start = _opt_int(data["timeline_start"])
            pending = data["pending"]
            self._pending = (
                None
                if pending is None
                else (int(pending[0]), int(pending[1]), Kind(pending[2]).value)
            )
            self._give_up_reasons = tuple(str(r) for r in data["give_up_reasons"])
            self._history = [plan_from_dict(p) for p in data["history"]]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise GuardStateInvalid(f"guard state: {exc!r}") from exc


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
