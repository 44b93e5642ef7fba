"""The training loop: ``python -m model.train --config FILE [--set key=value ...]``.

Run by the elasticd daemon (one process per local rank), by plain torchrun, or by hand (one
process). ``train()`` is a short loop over ``train_step()``; checkpoints, the divergence guard,
fault injection and the daemon's control requests are applied at step boundaries.

Step numbering: ``step`` is the global, persisted optimizer step; step ``s`` is the s-th update
(1-based) and checkpoint ``step-<s>`` holds the state after it. The batch of step ``s`` is a pure
function of (seed, stage, s, data ledger), so resuming at any world size is exact.

Exit codes: 0 done, 2 bad configuration, 3 diverged (rewind budget spent), 4 drained (a
checkpoint was committed at a step boundary because the daemon asked: the group is changing),
1 an error escaped (traceback on stderr), other non-zero (signals) for failures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from elastic import jsonlog
from elastic.channel import WORKER_DIR_ENV, Control, WorkerChannel, standby_ready_line
from elastic.checkpoint.app_state import app_state, restore_app_state
from elastic.checkpoint.errors import CheckpointExists
from elastic.checkpoint.manager import CheckpointManager
from elastic.checkpoint.storage import Storage
from elastic.config import ConfigError, fingerprint
from elastic.faults import FaultInjector
from elastic.guard import Action, CheckpointInfo, Guard, RewindPlan, Verdict
from model import distributed
from model.batches import BatchPlan, build_sampler, poison
from model.config import JobConfig, resolve
from model.gpt import GPT
from model.ledger import LrWindow, RunLedger

EXIT_OK = 0
EXIT_FAILED = 1  # an error escaped the loop (its traceback is on stderr)
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_DRAINED = 4  # checkpoint committed at a step boundary for a group change; not "done"
NODE_ENV = "ELASTICD_WORKER_NODE"
PAUSE_POLL_SECONDS = 0.25


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    verdict: Verdict
    drain: bool = False
    pause: bool = False
    rewind_to: int | None = None
    duration_seconds: float = 0.0


@dataclass
class ControlState:
    drain: bool = False
    pause: bool = False
    resume: bool = False
    rewind_to: int | None = None

    def take(self, control: Control | None) -> None:
        if control is None:
            return
        if control.action == "drain":
            self.drain = True
        elif control.action == "pause":
            self.pause, self.resume = True, False
        elif control.action == "resume":
            self.pause, self.resume = False, True
        elif control.action == "rewind":
            self.rewind_to = control.to_step


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


@dataclass
class Trainer:
    job: JobConfig
    info: distributed.DistInfo
    channel: WorkerChannel
    log: Any = field(default_factory=lambda: jsonlog.get("train"))
    startup: dict[str, float] = field(default_factory=dict)  # seconds per start-up phase

    def __post_init__(self) -> None:
        built = time.monotonic()
        train = self.job.train
        self.plan: BatchPlan = build_sampler(self.job, self.info)
        torch.manual_seed(train.seed)
        self.model = GPT(self.job.model, seed=train.seed).to(self.info.device)
        distributed.shard(self.model, self.model.blocks, bf16=self.info.device.type == "cuda")
        if train.compile:
            self.model.compile_regions()
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, train.weight_decay),
            lr=train.lr,
            betas=(train.beta1, train.beta2),
        )
        self.ckpt = CheckpointManager(
            self.job.checkpoint,
            run_id=self.job.run_id,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        self.guard = Guard(self.job.guard, self.job.rewind)
        self.ledger = RunLedger()
        self.run_files = RunFiles(self.ckpt.storage, self.job.run_id)
        self.faults = FaultInjector(self.job.faults, rank=self.info.rank, record=self.run_files)
        self.spikes: list[LrWindow] = []
        self.committed: dict[int, bool] = {}
        self.control = ControlState()
        self.step = 0
        self.last_loss = float("nan")
        self.startup["build_seconds"] = round(time.monotonic() - built, 3)

    # ----------------------------------------------------------------- schedule
    def lr_at(self, step: int) -> float:
        t = self.job.train
        if t.warmup_steps and step <= t.warmup_steps:
            base = t.lr * step / t.warmup_steps
        else:
            span = max(1, t.steps - t.warmup_steps)
            progress = min(1.0, (step - t.warmup_steps) / span)
            base = t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
        for window in self.spikes:
            if window.start_step <= step < window.end_step:
                base *= window.factor
        return base * self.guard.lr_scale(step)

    # ----------------------------------------------------------------- one step
    def train_step(self, step: int) -> StepResult:
        started = time.perf_counter()
        info, train = self.info, self.job.train
        micro_batches = self.plan.local(step)
        poisoned = self.faults.due("poison_batch", step)
        nan_fault = self.faults.due("nan", step)
        for kind, fault in (("poison_batch", poisoned), ("nan", nan_fault)):
            if fault is not None:
                self._log_fault(kind, step)
        self.optimizer.zero_grad(set_to_none=True)
        # Scaled so FSDP's mean over ranks yields the exact gradient of the global mean loss.
        scale = info.world_size / self.plan.global_tokens(step)
        ce_local = 0.0
        for index, (inputs, targets) in enumerate(micro_batches):
            if poisoned is not None:
                inputs, targets = poison(inputs, targets, mode=poisoned.mode, step=step)
            self.model.set_requires_gradient_sync(index == len(micro_batches) - 1)
            logits, _ = self.model(inputs.to(info.device))  # (B, T, vocab)
            terms = self.model.loss_terms(logits, targets.to(info.device))
            loss = self.model.objective(terms, num_tokens=1) * scale
            ce_sum = terms.ce_sum
            if nan_fault is not None:
                loss = loss * float("nan")
            loss.backward()
            ce_local += float(ce_sum.detach())  # sync point, once per micro-batch
        grad_norm = _grad_norm(self.model, train.grad_clip)
        self.control.take(self.channel.poll())
        return self._agree(step, ce_local, grad_norm, started)

    def _agree(self, step: int, ce_local: float, grad_norm: float, started: float) -> StepResult:
        """The one per-step collective: loss, finiteness, grad norm and control, then a verdict."""
        main = self.info.is_main
        nonfinite = 0.0 if math.isfinite(ce_local) else 1.0
        c = self.control
        sums = distributed.sum_across_ranks(
            [
                ce_local / self.plan.global_tokens(step),
                nonfinite,
                grad_norm if main else 0.0,  # rank 0's value: identical bits on every rank
                float(c.drain),
                float(c.pause),
                # rank 0's rewind request, as step + 1 (0: none); other ranks add 0.
                float(c.rewind_to + 1 if (main and c.rewind_to is not None) else 0),
            ],
            self.info.device,
        )
        loss, grad_norm = sums[0], sums[2]
        finite = sums[1] == 0 and math.isfinite(loss) and math.isfinite(grad_norm)
        verdict = self.guard.observe(step, loss=loss, grad_norm=grad_norm, finite=finite)
        # An async save copies the state in the background while forward and backward run
        # (they only read it); the copy must be complete before the state changes in place.
        self.ckpt.wait_staged()
        if verdict.action is Action.OK:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(step)
            self.optimizer.step()
        rewind_to = int(sums[5]) - 1 if sums[5] > 0 else None
        return StepResult(
            step,
            loss,
            grad_norm,
            verdict,
            drain=sums[3] > 0,
            pause=sums[4] > 0,
            rewind_to=rewind_to,
            duration_seconds=time.perf_counter() - started,
        )

    # ----------------------------------------------------------------- the loop
    def train(self) -> int:
        self.channel.beat(self.step, "load")
        self.restore()
        if self.faults.due("crash_on_start") is not None:
            self._log_fault("crash_on_start", self.step)
            os._exit(13)
        while self.step < self.job.train.steps:
            next_step = self.step + 1
            self._fire_process_faults(next_step)
            if self.plan.stage_index(next_step) != self.plan.stage_index(self.step):
                self.guard.reset_statistics()  # a planned change of data, not a divergence
                self._log_event("stage", stage=self.plan.stage_index(next_step))
            result = self.train_step(next_step)
            self.step = next_step
            self._log_step(result)
            self.channel.beat(self.step)
            code = self._after_step(result)
            if code is not None:
                return code
        self._save(self.step, reason="final")
        self.ckpt.wait()
        self._log_event("done", final_loss=self.last_loss)
        return EXIT_OK

    def _after_step(self, result: StepResult) -> int | None:
        if result.verdict.action is not Action.OK:
            code = self._on_anomaly(result)
            if code is not None:
                return code
        else:
            self.last_loss = result.loss
        if result.rewind_to is not None:
            self.control.rewind_to = None
            self._manual_rewind(result.rewind_to, trigger_step=result.step)
            return None
        if self.step % self.job.checkpoint.interval_steps == 0:
            self._save(self.step, reason="interval")
        self._promote()
        self._maybe_eval()
        if result.pause and not result.drain:
            result.drain = self._paused()
        if result.drain:
            self._save(self.step, reason="drain")
            self.ckpt.wait()
            self._log_event("drain", status="drained")
            return EXIT_DRAINED
        return None

    def _on_anomaly(self, result: StepResult) -> int | None:
        verdict = result.verdict
        self._log_event(
            "divergence",
            kind=verdict.kind,
            action=verdict.action.value,
            reasons=list(verdict.reasons),
            onset_step=verdict.onset_step,
            loss=result.loss,
            grad_norm=result.grad_norm,
        )
        self.ledger.record(
            "divergence",
            step=result.step,
            kind=verdict.kind,
            action=verdict.action.value,
            onset_step=verdict.onset_step,
        )
        if verdict.action is Action.SKIP_STEP:
            return None
        if verdict.action is Action.REWIND:
            checkpoints = [CheckpointInfo(s, good) for s, good in sorted(self.committed.items())]
            plan = self.guard.plan_rewind(
                verdict, trigger_step=result.step, checkpoints=checkpoints
            )
            if isinstance(plan, RewindPlan):
                self._rewind(plan)
                return None
            return self._give_up(plan.reasons)
        return self._give_up(verdict.reasons)

    def _give_up(self, reasons: Sequence[str]) -> int:
        self.ledger.record("diverged", step=self.step, reasons=list(reasons))
        self._write_ledger()
        self._log_event("diverged", reasons=list(reasons), level="error")
        self.ckpt.wait()
        return EXIT_DIVERGED

    # ----------------------------------------------------------------- rewind
    def _rewind(self, plan: RewindPlan) -> None:
        self.ckpt.wait()
        if self.info.is_main:
            self.ckpt.retire_after(plan.to_step)
        dist.barrier()
        window = (plan.to_step + 1, plan.trigger_step + 1)
        self.ledger.add_data_action(plan.data_action, *window)
        self.guard.record_rewind(plan)
        self.plan = self.plan.with_ledger(self.ledger.data)
        # An lr_spike that started after the target belongs to the abandoned stretch: it fired
        # (and was recorded) once; the replay re-fires it only if its `times` allow.
        self.spikes = [w for w in self.spikes if w.start_step <= plan.to_step]
        self._load(step=plan.to_step, keep_ledger=True)
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
        self._log_event("rewind", **details)

    def _manual_rewind(self, to_step: int, *, trigger_step: int) -> None:
        if to_step not in self.committed:
            self._log_event(
                "rewind_refused", to_step=to_step, reason="no such checkpoint", level="warning"
            )
            return
        rewind = self.job.rewind
        reason = f"operator request: rewind to step {to_step}"
        self.guard.request_rewind(trigger_step, onset_step=to_step + 1, reason=reason)
        plan = RewindPlan(
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
        self._rewind(plan)

    # ----------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return app_state(self.model, self.optimizer)

    def _meta(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.to_json(),
            "guard": self.guard.state_dict(),
            "data": {"step": self.step, "stage": self.plan.stage_index(self.step + 1)},
            "fingerprint": {"model": fingerprint(self.job.model), "job": fingerprint(self.job)},
            "health": {"loss": self.last_loss, "guard_state": str(self.guard.state.value)},
        }

    def _save(self, step: int, *, reason: str) -> None:
        if step in self.committed or step == 0:
            return
        self.channel.beat(step, "save")
        try:
            self.ckpt.save(step, self._state(), meta=self._meta(), background_staging=True)
        except CheckpointExists as exc:
            # A committed checkpoint we fell back past (it failed verification) holds this
            # step: never overwrite a committed checkpoint; the next interval saves instead.
            self._log_event(
                "checkpoint_skipped", checkpoint_step=step, reason=str(exc), level="warning"
            )
            return
        finally:
            self.channel.beat(step, "train")
        self.committed[step] = False

    def _load(self, *, step: int | None, keep_ledger: bool) -> None:
        state = self._state()
        manifest = self.ckpt.load(state, step=step)
        if manifest is None:
            return
        restore_app_state(self.model, self.optimizer, state)
        self.step = manifest.step
        if not keep_ledger:
            self._adopt_meta(manifest.meta, manifest.step)

    def _adopt_meta(self, meta: dict[str, Any], step: int) -> None:
        saved = RunLedger.from_json(meta.get("ledger"))
        stored = RunLedger.from_json(self._read_ledger())
        self.ledger = saved.merged(stored)
        guard_state = meta.get("guard")
        if stored.at_step is not None and stored.at_step >= step and stored.guard is not None:
            guard_state = stored.guard  # a rewind happened after this checkpoint was saved
        self.guard = Guard(self.job.guard, self.job.rewind, state=guard_state)
        self.plan = self.plan.with_ledger(self.ledger.data)
        if meta.get("fingerprint", {}).get("model") != fingerprint(self.job.model):
            self._log_event("config_changed", section="model", level="warning")

    def restore(self) -> None:
        started = time.monotonic()
        self._load(step=None, keep_ledger=False)
        self.committed = {m.step: m.known_good for m in self.ckpt.list() if m.step <= self.step}
        self.spikes = []
        jsonlog.bind(step=None)
        # Where a (re)start's seconds went: the daemon's resize/recovery timelines read these.
        timing = {**self.startup, "load_seconds": round(time.monotonic() - started, 3)}
        self._log_event(
            "start", resumed_from=self.step or None, world_size=self.info.world_size, **timing
        )

    def _promote(self) -> None:
        checkpoints = [CheckpointInfo(s, good) for s, good in sorted(self.committed.items())]
        for step in self.guard.promotions(step=self.step, checkpoints=checkpoints):
            if self.info.is_main:
                self.ckpt.wait()
                self.ckpt.mark_known_good(step)
            self.committed[step] = True

    def _write_ledger(self) -> None:
        self.ledger.guard = self.guard.state_dict()
        if self.info.is_main:
            self.run_files.write_bytes(RunLedger.FILE, self.ledger.dumps())

    def _read_ledger(self) -> dict[str, Any] | None:
        if not self.run_files.exists(RunLedger.FILE):
            return None
        return RunLedger.loads(self.run_files.read_bytes(RunLedger.FILE))

    # ----------------------------------------------------------------- control, faults, eval
    def _paused(self) -> bool:
        """Hold at this step boundary until every rank sees resume (False) or drain (True)."""
        self._log_event("paused")
        while True:
            self.channel.beat(self.step, "paused")
            time.sleep(PAUSE_POLL_SECONDS)
            self.control.take(self.channel.poll())
            resume, drain = distributed.sum_across_ranks(
                [float(self.control.resume), float(self.control.drain)], self.info.device
            )
            if drain > 0 or resume > 0:
                self.control.resume = False
                self._log_event("resumed")
                return drain > 0

    def _fire_process_faults(self, step: int) -> None:
        spike = self.faults.due("lr_spike", step)
        if spike is not None:
            self.spikes.append(LrWindow(step, step + spike.duration_steps, spike.factor))
            self._log_fault("lr_spike", step)
        if self.faults.due("kill", step) is not None:
            self._log_fault("kill", step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.faults.due("hang", step) is not None:
            self._log_fault("hang", step)
            while True:  # no heartbeat from here on: the daemon's watchdog must notice
                time.sleep(3600)

    def _maybe_eval(self) -> None:
        every = self.job.data.eval_every_steps
        if every <= 0 or self.step % every:
            return
        self.channel.beat(self.step, "eval")
        losses = self.plan.evaluate(self.model, self.info.device)
        self._log_event("eval", losses=losses)

    # ----------------------------------------------------------------- logs
    def _log_step(self, result: StepResult) -> None:
        if not self.info.is_main:
            return
        tokens = self.plan.global_tokens(result.step)
        fields: dict[str, Any] = {
            "step": result.step,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "lr": self.lr_at(result.step),
            "world_size": self.info.world_size,
            "tokens_per_s": round(tokens / max(result.duration_seconds, 1e-9), 1),
            "step_seconds": round(result.duration_seconds, 5),
            "skipped": result.verdict.action is not Action.OK,
        }
        if self.job.train.log_sample_ids:
            fields["sample_ids"] = self.plan.global_sample_ids(result.step)
        self.log.info("step", **fields)

    def _log_fault(self, kind: str, step: int) -> None:
        """From the rank that fires it (often not rank 0), flushed before the fault acts."""
        self.log.warning("fault_injected", kind=kind, step=step)
        sys.stdout.flush()

    def _log_event(self, event: str, *, level: str = "info", **fields: Any) -> None:
        if self.info.is_main:
            getattr(self.log, level)(event, step=self.step, **fields)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (embeddings and projections), not on norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]


def _grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def warm_up() -> None:
    """Standby only: import now what the first round would import lazily on its critical path.

    FSDP2's ``fully_shard`` imports ``torch._dynamo`` on first use (about 1-2 s of CPU), and
    demo runs import the corpus code; a standby process pays for both before it is needed. The
    ready line is relayed once a round takes the process (its ``ts`` says whether it was warm).
    """
    started = time.monotonic()
    import torch._dynamo  # noqa: F401

    import model.prepare  # noqa: F401

    print(standby_ready_line(time.monotonic() - started), flush=True)


@record  # writes the root cause to TORCHELASTIC_ERROR_FILE for the daemon's worker_exit line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument(
        "--standby",
        action="store_true",
        help="(daemon) wait on stdin for the round's env, imports done",
    )
    args = parser.parse_args(argv)
    if args.standby:
        warm_up()
        order = sys.stdin.readline()
        if not order:
            return EXIT_OK  # the daemon closed its pool
        os.environ.update(json.loads(order)["env"])
    started = time.monotonic()
    try:
        job = resolve(args.config, environ=os.environ, sets=args.sets)
    except ConfigError as exc:
        print(f"elasticd: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if job.train.threads:
        torch.set_num_threads(job.train.threads)
    configured = time.monotonic()
    info = distributed.init(os.environ, device_preference=job.train.device)
    jsonlog.configure(run_id=job.run_id, node=os.environ.get(NODE_ENV), rank=info.rank)
    startup = {
        "config_seconds": round(configured - started, 3),
        "process_group_seconds": round(time.monotonic() - configured, 3),
    }
    code = EXIT_CONFIG
    try:
        channel = WorkerChannel(os.environ.get(WORKER_DIR_ENV), local_rank=info.local_rank)
        code = Trainer(job, info, channel, startup=startup).train()
        return code
    except ConfigError as exc:
        print(f"elasticd: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        distributed.shutdown(clean=code in (EXIT_OK, EXIT_DRAINED, EXIT_DIVERGED))


def run_main(argv: Sequence[str] | None = None) -> int:
    """:func:`main`, with an escaping error printed and turned into ``EXIT_FAILED``.

    The process then leaves through :func:`distributed.exit_now` on every path, error included,
    so no interpreter or C++ teardown can keep a failed worker alive. On an H100 (NCCL, torch
    2.11) a benchmark's worker whose async save had failed did not exit within 400 s; which
    part of the teardown held it was not isolated.
    """
    try:
        code = main(argv)  # torch's @record turns SystemExit(0) (--help) into None
        return EXIT_OK if code is None else code
    except SystemExit as exc:  # argparse: --help, bad arguments
        return (
            exc.code if isinstance(exc.code, int) else EXIT_OK if exc.code is None else EXIT_FAILED
        )
    except BaseException:  # reported here; the exit code says it failed
        traceback.print_exc()
        return EXIT_FAILED


if __name__ == "__main__":
    # Everything durable (checkpoints, ledger, logs) is written by now.
    distributed.exit_now(run_main())
