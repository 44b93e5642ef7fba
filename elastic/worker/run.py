"""``Run``: what a training loop holds to be supervised by elasticd.

The loop owns its model, data and step; the run owns everything around the step::

    run = elastic.worker.init()                      # process group, config, channel
    run.track(model=model, optim=optimizer)          # what a checkpoint holds
    for step in run.steps(total_steps):              # restore, boundaries, exit code
        loss, grad_norm = ...                        # the loop's forward and backward
        if run.report(loss=loss, grad_norm=grad_norm).apply:
            optimizer.step()
    raise SystemExit(run.finish())

At each step boundary (after the body of step ``s``) the run logs the step line, beats, commits
a checkpoint every ``checkpoint.interval_steps``, promotes known-good checkpoints, and acts on
what all ranks agreed in ``report()``: a guard anomaly (skip, rewind, give up), an operator's
rewind, pause, drain. A rewind reloads every tracked object and moves ``step`` back: the next
step ``steps()`` yields is the one after the rewind target, so everything the loop derives from
``step`` (its data, its schedule) replays. Exit codes follow :class:`elastic.protocol.ExitCode`.

The run also keeps the data chain (:class:`~elastic.worker.ledger.DataChain`): the sample ids a
rank drew for a step (``run.sampler()``'s sampler reports them, other loops call
:meth:`Run.consumed`) ride in the step's vote, and every checkpoint carries the chain, so
``elasticctl audit`` can check the data of the whole run (docs/data.md).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from elastic import jsonlog
from elastic.channel import WorkerChannel
from elastic.checkpoint.errors import CheckpointExists
from elastic.checkpoint.manager import CheckpointManager
from elastic.faults import FaultConfig, FaultInjector
from elastic.guard import Action, RewindPlan, Verdict
from elastic.protocol import Event, ExitCode, Phase, restore_step
from elastic.worker.config import RunConfig
from elastic.worker.control import ControlState
from elastic.worker.dist import DistInfo, shutdown, sum_across_ranks
from elastic.worker.drills import Drills
from elastic.worker.hardware import peak_flops, peak_memory_bytes
from elastic.worker.ledger import DataChain, sample_sums
from elastic.worker.recovery import Recovery, RunFiles, rewind_horizon
from elastic.worker.sampler import ElasticSampler
from elastic.worker.state import TrackedState
from elastic.worker.vote import AgreedStep, Number, StepVote

PAUSE_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class StepVerdict:
    """What ``report()`` tells the loop: apply this step's update or skip it."""

    apply: bool
    lr_scale: float  # multiply the loop's learning rate by this (rewind damping, drills)
    loss: float  # the agreed loss (weighted mean over ranks)
    grad_norm: float
    action: Action
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Outcome:
    agreed: AgreedStep
    verdict: Verdict
    reported: bool  # the loop called report() (else the loss is unknown)
    lr: float | None
    lr_scale: float
    counted: bool  # the loop passed token counts (else tokens_per_s is unknown)
    flops_per_token: float | None  # the loop's model FLOPs per token (else no MFU)
    fields: Mapping[str, Any]


class Run:
    def __init__(
        self,
        config: RunConfig,
        info: DistInfo,
        *,
        channel: WorkerChannel,
        fingerprints: Mapping[str, str] | None = None,
        startup: Mapping[str, float] | None = None,
    ) -> None:
        self.config = config
        self.info = info
        self.channel = channel
        self.log = jsonlog.get("train")
        self.ckpt = CheckpointManager(
            config.checkpoint,
            run_id=config.run_id,
            rank=info.rank,
            world_size=info.world_size,
            rewind_horizon=rewind_horizon(config.guard, config.rewind),
        )
        files = RunFiles(self.ckpt.storage, config.run_id)
        self.recovery = Recovery(config.guard, config.rewind, files=files, is_main=info.is_main)
        self.drills = Drills(
            FaultInjector(config.faults, rank=info.rank, record=files), log=self.log
        )
        self.step = 0
        self.exit_code: ExitCode | None = None
        self.last_loss = float("nan")
        self._state = TrackedState()
        self._control = ControlState()
        self._fingerprints = dict(fingerprints or {})
        self.startup = dict(startup or {})
        self._restored = False
        self._current: int | None = None
        self._outcome: _Outcome | None = None
        self._phase_seconds = 0.0  # of the current step, spent in run.phase(...)
        self._step_started = 0.0  # perf_counter() when the current step's body began
        self._compute_seconds: float | None = None  # of the current step, up to its vote
        self.data_chain = DataChain()
        # Dense peak FLOP/s of one device (None: unknown, no MFU); a loop may set its own.
        self.peak_flops_per_device: float | None = peak_flops(info.device)
        self._total_steps: int | None = None  # steps() argument, for the step line
        self._drawn: dict[int, Sequence[int]] = {}  # step -> this rank's sample ids of it

    # ----------------------------------------------------------------- set-up
    def track(self, **objects: Any) -> None:
        """Objects to checkpoint and restore (model, optimizer, scheduler, any Stateful)."""
        for name, obj in objects.items():
            self._state.add(name, obj)

    def sampler(
        self, num_samples: int, *, global_batch_size: int, seed: int = 0, audit: bool = True
    ) -> ElasticSampler:
        """A sampler for a map-style dataset that follows this run's rewinds and world size.

        With ``audit`` its local draws are the run's data record (:meth:`consumed`) and its
        description goes into every checkpoint for ``elasticctl audit``; one such sampler per
        run: pass ``audit=False`` for one whose samples are not trained on (evaluation)."""
        sampler = ElasticSampler(
            num_samples,
            global_batch_size=global_batch_size,
            seed=seed,
            ledger=lambda: self.recovery.data,
            rank=self.info.rank,
            world_size=self.info.world_size,
            on_draw=self.consumed if audit else None,
        )
        if audit:
            self.audit_data(sampler.describe())
        return sampler

    def audit_data(self, sampler: Mapping[str, Any]) -> None:
        """Declare the pure sampler the run's data follows (JSON with a ``kind`` that
        :mod:`ops.audit` rebuilds); ``run.sampler()`` does it for its sampler."""
        self.data_chain.declare(sampler)

    def consumed(self, step: int, sample_ids: Sequence[int]) -> None:
        """This rank's sample ids of ``step``, all in one call (a second call for the step
        replaces the first). No collective: they ride in the step's vote. Loops with their own
        sampler call it before ``report()``; ``run.sampler()``'s sampler calls it itself."""
        self._drawn[step] = list(sample_ids)

    def restore(self) -> int:
        """COLLECTIVE. Load the newest committed checkpoint into the tracked objects (resharded
        to this world size); the step to continue after (0 for a fresh run)."""
        started = time.monotonic()
        self.channel.beat(self.step, Phase.LOAD)
        listed = self.ckpt.list()
        restart_step = restore_step(os.environ)
        if restart_step is not None and restart_step not in {m.step for m in listed}:
            # Every rank reads the same list: all leave here, before any collective.
            committed = sorted(m.step for m in listed)
            print(
                f"elasticd: invalid config: rewind --to-step={restart_step}: no committed "
                f"checkpoint at that step (committed: {committed})",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(int(ExitCode.CONFIG))
        manifest = self._load(step=restart_step)
        self.recovery.adopt(manifest, listed=listed)
        if restart_step is not None:
            self._restart_after_diverged(restart_step)
        self._check_fingerprints(manifest.meta if manifest else {})
        self._restored = True
        jsonlog.bind(step=None)
        timing: dict[str, Any] = {
            **self.startup,
            "load_seconds": round(time.monotonic() - started, 3),
        }
        self.event(
            Event.START, resumed_from=self.step or None, world_size=self.info.world_size, **timing
        )
        return self.step

    # ----------------------------------------------------------------- the loop
    def steps(self, total: int) -> Iterator[int]:
        """The steps still to train, ``step + 1 .. total``, with every boundary handled.

        Ends early on a drain (exit DRAINED) or when the guard gives up (DIVERGED).
        """
        if not self._restored:
            self.restore()
        self._total_steps = total
        self.drills.at_start(self.step)
        while self.step < total:
            step = self.step + 1
            self.drills.before_step(step)
            self._current, self._outcome, self._phase_seconds = step, None, 0.0
            started = self._step_started = time.perf_counter()
            yield step
            # A step whose body did not report still takes part in the control vote.
            outcome = self._outcome if self._outcome is not None else self._vote(step, loss=None)
            # Time in a phase (eval) is not the step's: tokens_per_s measures training.
            duration = time.perf_counter() - started - self._phase_seconds
            self._current = None
            self.step = step
            self.data_chain.advance(step, outcome.agreed.drawn)
            self._log_step(step, duration)
            self.channel.beat(
                self.step,
                compute_seconds=self._compute_seconds,
                step_tokens=self._step_tokens(),
                peak_memory_bytes=peak_memory_bytes(self.info.device),
            )
            code = self._boundary(step)
            if code is not None:
                self.exit_code = code
                return
        self.save(reason="final")
        self.ckpt.wait()
        self.event(Event.DONE, final_loss=self.last_loss)
        self.exit_code = ExitCode.OK

    def report(
        self,
        *,
        loss: Number,
        grad_norm: Number | None = None,
        tokens: Number | None = None,
        lr: float | None = None,
        flops_per_token: float | None = None,
        **fields: Any,
    ) -> StepVerdict:
        """COLLECTIVE, once per step before ``optimizer.step()``. ``loss`` is this rank's mean
        loss (weighted by ``tokens`` across ranks when given), ``grad_norm`` the global norm
        (rank 0's value counts). ``lr`` and ``fields`` go into the step line; with ``tokens``
        the line has the group's tokens, and with ``flops_per_token`` too (the model's
        training FLOPs per token, e.g. 6N + attention) the step's FLOPs and MFU."""
        step = self._current
        if step is None:
            raise RuntimeError("report() is called inside a step of run.steps()")
        if self._outcome is not None:
            raise RuntimeError(f"report() called twice in step {step}: once per step")
        if self.drills.nan(step):
            loss = loss * float("nan")
        outcome = self._vote(
            step,
            loss=loss,
            grad_norm=grad_norm,
            tokens=tokens,
            lr=lr,
            flops_per_token=flops_per_token,
            fields=fields,
        )
        return StepVerdict(
            apply=outcome.verdict.action is Action.OK,
            lr_scale=outcome.lr_scale,
            loss=outcome.agreed.loss,
            grad_norm=outcome.agreed.grad_norm,
            action=outcome.verdict.action,
            reasons=tuple(outcome.verdict.reasons),
        )

    def _vote(
        self,
        step: int,
        *,
        loss: Number | None,
        grad_norm: Number | None = None,
        tokens: Number | None = None,
        lr: float | None = None,
        flops_per_token: float | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> _Outcome:
        """COLLECTIVE: the step vote, then the guard's verdict (``loss`` None: a step the loop
        did not report, which votes on control only and never reaches the guard)."""
        self.drills.in_step(step)  # a `slow` drill: before the collective, so it is compute
        # Measured before the collective: waiting in it equalises every rank's wall time, so
        # only the time up to here tells a straggler from the ranks that wait for it.
        self._compute_seconds = time.perf_counter() - self._step_started - self._phase_seconds
        self._control.take(self.channel.poll())
        c = self._control
        drawn = self._drawn.pop(step, ())
        for stale in [s for s in self._drawn if s < step]:  # drawn for steps a rewind dropped
            del self._drawn[stale]
        vote = StepVote.of(
            loss=0.0 if loss is None else loss,
            tokens=tokens,
            grad_norm=grad_norm,
            drain=c.drain,
            pause=c.pause,
            rewind_to=c.rewind_to,
            is_main=self.info.is_main,
            drawn=sample_sums(step, drawn),
        )
        agreed = vote.agree(self.info.device)
        verdict = Verdict(Action.OK)
        if loss is not None:
            verdict = self.recovery.observe(
                step, loss=agreed.loss, grad_norm=agreed.grad_norm, finite=agreed.finite
            )
        # An async save copies the state in the background while forward and backward run
        # (they only read it); the copy must be complete before the state changes in place.
        self.ckpt.wait_staged()
        lr_scale = self.lr_scale(step)
        self._outcome = _Outcome(
            agreed=agreed,
            verdict=verdict,
            reported=loss is not None,
            lr=None if lr is None else lr * lr_scale,
            lr_scale=lr_scale,
            counted=tokens is not None,
            flops_per_token=flops_per_token,
            fields=dict(fields or {}),
        )
        return self._outcome

    def lr_scale(self, step: int) -> float:
        """The learning-rate multiplier of ``step``: rewind damping times an lr_spike drill."""
        return self.recovery.lr_scale(step) * self.drills.lr_factor(step)

    def fault(self, kind: str) -> FaultConfig | None:
        """A data fault (``poison_batch``) due at the current step on this rank, if any."""
        if kind != "poison_batch":
            raise ValueError(f"fault({kind!r}): only poison_batch is applied by the loop")
        return None if self._current is None else self.drills.poison(self._current)

    def finish(self) -> int:
        """Wait for pending saves, leave the group; the process's exit code."""
        code = ExitCode.OK if self.exit_code is None else self.exit_code
        try:
            self.ckpt.wait()
        finally:
            shutdown(clean=code in (ExitCode.OK, ExitCode.DRAINED, ExitCode.DIVERGED))
        return int(code)

    # ----------------------------------------------------------------- events
    def event(self, event: Event | str, *, level: str = "info", **fields: Any) -> None:
        """A lifecycle line from rank 0 (``elasticctl events`` and metrics read some)."""
        if self.info.is_main:
            getattr(self.log, level)(str(event), step=self.step, **fields)

    def phase(self, phase: Phase) -> _PhaseBeat:
        """``with run.phase(Phase.EVAL):`` beats the phase, then back to training."""
        return _PhaseBeat(self, phase)

    def data_changed(self) -> None:
        """A planned change of the data (a new stage): the guard warms up again."""
        self.recovery.data_changed()

    # ----------------------------------------------------------------- boundary
    def _boundary(self, step: int) -> ExitCode | None:
        assert self._outcome is not None
        outcome = self._outcome
        if outcome.verdict.action is not Action.OK:
            code = self._on_anomaly(step, outcome)
            if code is not None:
                return code
        elif outcome.reported:
            self.last_loss = outcome.agreed.loss
        if outcome.agreed.rewind_to is not None:
            self._control.rewind_to = None
            self._operator_rewind(outcome.agreed.rewind_to, trigger_step=step)
            return None
        if step % self.config.checkpoint.interval_steps == 0:
            self.save(reason="interval")
        self._promote()
        drain = outcome.agreed.drain
        if outcome.agreed.pause and not drain:
            drain = self._paused()
        if drain:
            self.save(reason="drain")
            self.ckpt.wait()
            self.event(Event.DRAIN, status="drained")
            return ExitCode.DRAINED
        return None

    def _on_anomaly(self, step: int, outcome: _Outcome) -> ExitCode | None:
        verdict = outcome.verdict
        self.event(
            Event.DIVERGENCE,
            kind=verdict.kind,
            action=verdict.action.value,
            reasons=list(verdict.reasons),
            onset_step=verdict.onset_step,
            loss=outcome.agreed.loss,
            grad_norm=outcome.agreed.grad_norm,
        )
        self.recovery.record_anomaly(step, verdict)
        if verdict.action is Action.SKIP_STEP:
            return None
        if verdict.action is Action.REWIND:
            plan = self.recovery.plan(verdict, trigger_step=step)
            if isinstance(plan, RewindPlan):
                self._rewind(plan)
                return None
            return self._give_up(plan.reasons)
        return self._give_up(verdict.reasons)

    def _give_up(self, reasons: tuple[str, ...] | list[str]) -> ExitCode:
        self.recovery.give_up(self.step, reasons)
        self.event(Event.DIVERGED, reasons=list(reasons), level="error")
        self.ckpt.wait()
        return ExitCode.DIVERGED

    def _operator_rewind(self, to_step: int, *, trigger_step: int) -> None:
        plan = self.recovery.operator_plan(to_step, trigger_step=trigger_step)
        if plan is None:
            self.event(
                Event.REWIND_REFUSED, to_step=to_step, reason="no such checkpoint", level="warning"
            )
            return
        self._rewind(plan)

    def _restart_after_diverged(self, step: int) -> None:
        """COLLECTIVE. The operator's way out of ``diverged``: continue from ``step`` with
        later checkpoints retired and a fresh guard budget. Fault firings are kept (unlike a
        guard rewind): the operator fixed the cause before restarting."""
        if self.info.is_main:
            self.ckpt.retire_after(step)
        dist.barrier()
        details = self.recovery.restart_from(step)
        self.event(Event.REWIND, **details)

    def _rewind(self, plan: RewindPlan) -> None:
        self.ckpt.wait()
        if self.info.is_main:
            self.ckpt.retire_after(plan.to_step)
        dist.barrier()
        details = self.recovery.rewind(plan)
        self.drills.forget_after(plan.to_step)
        self._load(step=plan.to_step)
        self.event(Event.REWIND, **details)

    def _promote(self) -> None:
        for step in self.recovery.promotions(self.step):
            if self.info.is_main:
                self.ckpt.mark_known_good(step)  # waits only for a save of this step

    def _paused(self) -> bool:
        """Hold at this step boundary until any rank sees resume (False) or drain (True)."""
        self.event(Event.PAUSED)
        c = self._control
        while True:
            self.channel.beat(self.step, Phase.PAUSED)
            time.sleep(PAUSE_POLL_SECONDS)
            c.take(self.channel.poll())
            resume, drain = sum_across_ranks([float(c.resume), float(c.drain)], self.info.device)
            if drain > 0 or resume > 0:
                c.resume = False
                self.event(Event.RESUMED)
                return drain > 0

    # ----------------------------------------------------------------- checkpoints
    def save(self, *, reason: str = "manual") -> None:
        """COLLECTIVE. Commit the tracked state as the checkpoint of the current step."""
        step = self.step
        if step in self.recovery.committed or step == 0:
            return
        self.channel.beat(step, Phase.SAVE)
        meta = self.recovery.meta(last_loss=self.last_loss)
        meta["fingerprint"] = self._fingerprints
        meta["reason"] = reason
        chain = self.data_chain.meta()
        if chain is not None:
            meta["data_chain"] = chain
        try:
            self.ckpt.save(step, self._state.build(), meta=meta, background_staging=True)
        except CheckpointExists as exc:
            # A committed checkpoint we fell back past (it failed verification) holds this
            # step: never overwrite a committed checkpoint; the next interval saves instead.
            self.event(
                Event.CHECKPOINT_SKIPPED, checkpoint_step=step, reason=str(exc), level="warning"
            )
            return
        finally:
            self.channel.beat(step, Phase.TRAIN)
        self.recovery.saved(step)
        self.data_chain.saved()

    def _load(self, *, step: int | None) -> Any:
        state = self._state.build()
        manifest = self.ckpt.load(state, step=step)
        if manifest is not None:
            self._state.restore(state)
            self.step = manifest.step
            self.data_chain.restore(manifest.meta.get("data_chain"), step=manifest.step)
            self._drawn.clear()
        return manifest

    def _check_fingerprints(self, meta: Mapping[str, Any]) -> None:
        saved = meta.get("fingerprint") or {}
        for section, value in self._fingerprints.items():
            if section in saved and saved[section] != value:
                self.event(Event.CONFIG_CHANGED, section=section, level="warning")

    def _step_tokens(self) -> float | None:
        """The group's tokens of the step just done (already on the host: the vote's sum)."""
        outcome = self._outcome
        return outcome.agreed.tokens if outcome is not None and outcome.counted else None

    # ----------------------------------------------------------------- step line
    def _log_step(self, step: int, duration_seconds: float) -> None:
        if not self.info.is_main or self._outcome is None:
            return
        outcome = self._outcome
        agreed = outcome.agreed
        line: dict[str, Any] = {
            "step": step,
            "loss": agreed.loss if outcome.reported else None,
            "grad_norm": agreed.grad_norm if outcome.reported else None,
            "lr": outcome.lr,
            "world_size": self.info.world_size,
            "tokens_per_s": (
                round(agreed.tokens / max(duration_seconds, 1e-9), 1) if outcome.counted else None
            ),
            "step_seconds": round(duration_seconds, 5),
            "skipped": outcome.verdict.action is not Action.OK,
            "total_steps": self._total_steps,
            **self._work_fields(duration_seconds),
            **outcome.fields,
        }
        self.log.info(Event.STEP.value, **line)

    def _work_fields(self, duration_seconds: float) -> dict[str, Any]:
        """The step line's ``tokens`` (the group's), ``flops`` and ``mfu``, as far as known."""
        outcome = self._outcome
        if outcome is None or not outcome.counted:
            return {}
        tokens = outcome.agreed.tokens
        fields: dict[str, Any] = {"tokens": tokens}
        if outcome.flops_per_token is None:
            return fields
        flops = tokens * outcome.flops_per_token
        fields["flops"] = flops
        peak = self.peak_flops_per_device
        if peak and duration_seconds > 0:
            achieved = flops / duration_seconds
            fields["mfu"] = round(achieved / (peak * self.info.world_size), 5)
        return fields


class _PhaseBeat:
    def __init__(self, run: Run, phase: Phase) -> None:
        self._run, self._phase = run, phase
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()
        self._run.channel.beat(self._run.step, self._phase)

    def __exit__(self, *exc: object) -> None:
        self._run.channel.beat(self._run.step, Phase.TRAIN)
        self._run._phase_seconds += time.perf_counter() - self._started
