"""The bundled trainer: ``python -m model.train --config FILE [--set key=value ...]``.

A client of the worker API (:mod:`elastic.worker`) like any user's loop: the API sets up the
process group, restores and saves the tracked state, runs the guard vote, handles the daemon's
requests at step boundaries and owns the exit codes (:class:`elastic.protocol.ExitCode`). This
module owns only the workload: the GPT, its data mixture, the learning-rate schedule and the
step itself. Run by the elasticd daemon (one process per local rank), by plain torchrun, or by
hand (one process).

Step numbering: ``step`` is the global, persisted optimizer step; step ``s`` is the s-th update
(1-based) and checkpoint ``step-<s>`` holds the state after it. The batch of step ``s`` is a pure
function of (seed, stage, s, data ledger), so resuming at any world size is exact. The sample ids
each rank trains on go to the run's data chain (``run.consumed``), and the sampler's description
(:func:`mixture_description`) to every checkpoint, for ``elasticctl audit``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

import elastic.worker
from elastic.config import ConfigError, fingerprint, to_dict
from elastic.protocol import Event, ExitCode, Phase
from elastic.worker import Run, RunConfig
from elastic.worker.config import API_SECTIONS
from elastic.worker.dist import exit_now
from model import distributed
from model.batches import BatchPlan, build_sampler, poison
from model.config import JobConfig, TrainConfig, resolve
from model.gpt import GPT


def lr_at(train: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr`` at ``train.steps``."""
    if train.warmup_steps and step <= train.warmup_steps:
        return train.lr * step / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


class Trainer:
    """The GPT workload: model, optimizer and data plan, and one training step."""

    def __init__(self, job: JobConfig, run: Run) -> None:
        built = time.monotonic()
        self.job, self.run = job, run
        info, train = run.info, job.train
        self.plan: BatchPlan = build_sampler(job, info)
        torch.manual_seed(train.seed)
        self.model = GPT(job.model, seed=train.seed).to(info.device)
        distributed.shard(self.model, self.model.blocks, bf16=info.device.type == "cuda")
        if train.compile:
            self.model.compile_regions()
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, train.weight_decay),
            lr=train.lr,
            betas=(train.beta1, train.beta2),
        )
        run.track(model=self.model, optim=self.optimizer)
        if train.peak_flops_per_device:
            run.peak_flops_per_device = train.peak_flops_per_device
        run.audit_data(mixture_description(job, self.plan))
        run.startup["build_seconds"] = round(time.monotonic() - built, 3)

    def train(self) -> int:
        run = self.run
        for step in run.steps(self.job.train.steps):
            self._follow_ledger()
            if self.plan.stage_index(step) != self.plan.stage_index(step - 1):
                run.data_changed()  # a planned change of data, not a divergence
                run.event(Event.STAGE, stage=self.plan.stage_index(step))
            self.train_step(step)
            self._maybe_eval(step)
        return run.finish()

    def train_step(self, step: int) -> bool:
        """Forward, backward and (if the guard agrees) the update of ``step``."""
        info, train = self.run.info, self.job.train
        plan = self.plan
        micro_batches = plan.sampler.local_batch(
            step, dp_rank=plan.dp_rank, dp_size=plan.dp_size, micro_batch_size=plan.micro_batch_size
        )
        # The ids that came with the windows: what this rank really trains on (the audit's).
        self.run.consumed(step, [i for *_, ids in micro_batches for i in ids])
        poisoned = self.run.fault("poison_batch")
        self.optimizer.zero_grad(set_to_none=True)
        local_tokens = self.plan.local_tokens(step)  # ranks' slices may differ by one sample
        # Each rank's loss sum over the step's global token count, times the world size: FSDP's
        # mean over ranks then yields the exact gradient of the global mean loss, whatever the
        # split (uneven slices and padding micro-batches included).
        scale = info.world_size / self.plan.global_tokens(step)
        ce_sum = torch.zeros((), device=info.device)
        for index, (inputs, targets, _) in enumerate(micro_batches):
            if poisoned is not None:
                inputs, targets = poison(inputs, targets, mode=poisoned.mode, step=step)
            last = index == len(micro_batches) - 1
            self.model.set_requires_gradient_sync(last)  # type: ignore[operator]  # FSDP2's
            logits, _ = self.model(inputs.to(info.device))  # (B, T, vocab)
            terms = self.model.loss_terms(logits, targets.to(info.device))
            (self.model.objective(terms, num_tokens=1) * scale).backward()
            ce_sum = ce_sum + terms.ce_sum.detach().float()  # stays on the device: no sync
        grad_norm = _grad_norm(self.model, train.grad_clip)
        lr = lr_at(train, step)
        extra: dict[str, Any] = {}
        if train.log_sample_ids and info.is_main:
            extra["sample_ids"] = self.plan.global_sample_ids(step)
        verdict = self.run.report(
            loss=ce_sum / local_tokens,
            grad_norm=grad_norm,
            tokens=local_tokens,
            lr=lr,
            flops_per_token=self.model.flops_per_token(self.plan.sampler.seq_len_at(step)),
            **extra,
        )
        if verdict.apply:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * verdict.lr_scale
            self.optimizer.step()
        return verdict.apply

    def _follow_ledger(self) -> None:
        """After a rewind or a restore the data ledger changes: the plan reads through it."""
        data = self.run.recovery.data
        if data is not self.plan.sampler.ledger:
            self.plan = self.plan.with_ledger(data)

    def _maybe_eval(self, step: int) -> None:
        every = self.job.data.eval_every_steps
        if every <= 0 or step % every:
            return
        with self.run.phase(Phase.EVAL):
            losses = self.plan.evaluate(self.model, self.run.info.device)
        self.run.event(Event.EVAL, losses=losses)


def mixture_description(job: JobConfig, plan: BatchPlan) -> dict[str, Any]:
    """What rebuilds the sample ids of any step (:mod:`ops.audit`): an id is ``salt << 52 |
    data_step << 20 | position`` (:mod:`model.mixture`) for positions below the batch size of
    the step's stage; which window an id reads does not enter it."""
    starts = sorted({0, *(stage.start_step for stage in job.data.stages)})
    return {
        "kind": "mixture",
        "global_batch_tokens": plan.sampler.global_batch_tokens,
        "stages": [[start, plan.sampler.seq_len_at(start)] for start in starts],
    }


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (embeddings and projections), not on norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]


def _grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def run_config(job: JobConfig) -> RunConfig:
    """The worker API's view of the job (its sections, plus the whole document)."""
    sections = {name: getattr(job, name) for name in API_SECTIONS}
    return RunConfig(**sections, document=to_dict(job))


@record  # writes the root cause to TORCHELASTIC_ERROR_FILE for the daemon's worker_exit line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args(argv)
    try:
        job = resolve(args.config, environ=os.environ, sets=args.sets)
    except ConfigError as exc:
        print(f"elasticd: invalid config: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if job.train.threads:
        torch.set_num_threads(job.train.threads)
    run = elastic.worker.init(
        run_config(job), device=job.train.device, fingerprints={"model": fingerprint(job.model)}
    )
    try:
        return Trainer(job, run).train()
    except ConfigError as exc:  # the data or the batch geometry, found once the group formed
        print(f"elasticd: invalid config: {exc}", file=sys.stderr)
        return ExitCode.CONFIG


def run_main(argv: Sequence[str] | None = None) -> int:
    """:func:`main`, with an escaping error printed and turned into ``ExitCode.FAILED``.

    The process then leaves through :func:`exit_now` on every path, error included, so no
    interpreter or C++ teardown can keep a failed worker alive. On an H100 (NCCL, torch 2.11)
    a benchmark's worker whose async save had failed did not exit within 400 s; which part of
    the teardown held it was not isolated.
    """
    try:
        code = main(argv)  # torch's @record turns SystemExit(0) (--help) into None
        return ExitCode.OK if code is None else int(code)
    except SystemExit as exc:  # argparse: --help, bad arguments
        if isinstance(exc.code, int):
            return exc.code
        return ExitCode.OK if exc.code is None else ExitCode.FAILED
    except BaseException:  # reported here; the exit code says it failed
        traceback.print_exc()
        return ExitCode.FAILED


if __name__ == "__main__":
    # Everything durable (checkpoints, ledger, logs) is written by now.
    exit_now(run_main())
