"""What the training loop asks of the data: this rank's micro-batches of a step, token counts,
per-source evaluation, and the ``poison_batch`` fault. A thin layer over ``model.mixture``.

The global batch in tokens is fixed by ``train.global_batch_tokens`` whatever the world size;
each data-parallel rank takes its contiguous slice, split into micro-batches of at most
``train.micro_batch_size`` (gradient accumulation fills the rest). Where the batch does not
divide, slices differ by one sample and every rank still runs the same number of micro-batches
(:mod:`elastic.worker.split`); the trainer normalises by the global token count, so the update
does not depend on the world size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from elastic.config import ConfigError
from elastic.worker.split import BatchSplit
from model import distributed
from model.config import JobConfig
from model.geometry import check_world_sizes
from model.gpt import IGNORE_INDEX
from model.mixture import DataLedger, Sampler
from model.mixture import build_sampler as build_mixture
from model.shards import DataError


@dataclass(frozen=True)
class BatchPlan:
    sampler: Sampler
    dp_rank: int
    dp_size: int
    micro_batch_size: int
    eval_batches: int

    def local(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of ``step``: (inputs (B, T), targets (B, T)) each."""
        batches = self.sampler.local_batch(
            step,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            micro_batch_size=self.micro_batch_size,
        )
        return [(inputs, targets) for inputs, targets, _ in batches]

    def global_tokens(self, step: int) -> int:
        return self.sampler.batch_size(step) * self.sampler.seq_len_at(step)

    def local_tokens(self, step: int) -> int:
        """Tokens of this rank's slice of ``step`` (ranks may differ by one sample's worth)."""
        split = BatchSplit(self.sampler.batch_size(step), self.dp_size, self.micro_batch_size)
        return len(split.rank_slice(self.dp_rank)) * self.sampler.seq_len_at(step)

    def global_sample_ids(self, step: int) -> list[int]:
        return [s.sample_id for s in self.sampler.global_batch(step)]

    def stage_index(self, step: int) -> int:
        return self.sampler.stage_index(step)

    def with_ledger(self, ledger: DataLedger) -> BatchPlan:
        return replace(self, sampler=self.sampler.with_ledger(ledger))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Held-out loss per source. Every rank runs the same batches (FSDP needs all ranks in
        each forward); the result is therefore identical everywhere."""
        model.eval()
        seq_len = self.sampler.seq_len_at(0)
        losses: dict[str, float] = {}
        for source in self.sampler.names:
            ce_total, tokens = 0.0, 0
            for index in range(self.eval_batches):
                inputs, targets = self.sampler.eval_batch(
                    source, index=index, batch_size=self.micro_batch_size, seq_len=seq_len
                )
                logits, _ = model(inputs.to(device))  # (B, T, V)
                terms = model.loss_terms(logits, targets.to(device))  # type: ignore[operator]
                ce_total += float(terms.ce_sum)
                tokens += int(terms.num_tokens)
            losses[source] = round(ce_total / max(tokens, 1), 6)
        model.train()
        return losses


def build_sampler(job: JobConfig, info: distributed.DistInfo) -> BatchPlan:
    """Open the data (building the demo corpus once per node) and check the batch geometry."""
    data, train = job.data, job.train
    if data.uses_demo and info.world_size > 1:
        if info.local_rank == 0:
            _open(job)  # builds the corpus; the other local ranks wait, then only read it
        dist.barrier()
    sampler = _open(job)
    plan = BatchPlan(sampler, info.rank, info.world_size, train.micro_batch_size, data.eval_batches)
    _check_geometry(job, plan)
    return plan


def _open(job: JobConfig) -> Sampler:
    try:
        return build_mixture(
            job.data,
            run_dir=job.run_dir,
            seq_len=job.train.seq_len,
            global_batch_tokens=job.train.global_batch_tokens,
        )
    except (ValueError, FileNotFoundError, DataError) as exc:
        raise ConfigError(str(exc)) from exc


def _check_geometry(job: JobConfig, plan: BatchPlan) -> None:
    """Fail before anything is written: every stage must give each rank a sample."""
    sampler = plan.sampler
    vocab = job.model.resolved().vocab_size
    if vocab < sampler.vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab}: smaller than the data's tokenizer ({sampler.vocab_size} "
            f"ids, from the shard index); set model.vocab_size to at least {sampler.vocab_size}"
        )
    for start in sorted({0, *(s.start_step for s in job.data.stages)}):
        seq_len = sampler.seq_len_at(start)
        if seq_len > job.model.max_seq_len:
            raise ConfigError(
                f"model.max_seq_len={job.model.max_seq_len}: shorter than seq_len {seq_len} "
                f"used from step {start}"
            )
    check_world_sizes(job, [plan.dp_size])


def poison(
    inputs: torch.Tensor, targets: torch.Tensor, *, mode: str, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``poison_batch`` fault: random tokens, or one token repeated (degenerate data).

    Padding targets (``IGNORE_INDEX``) stay padding: a padding micro-batch must weigh nothing.
    """
    if mode == "repeat":
        poisoned = torch.full_like(inputs, int(inputs[0, 0]))
        return poisoned, torch.where(targets == IGNORE_INDEX, targets, poisoned)
    generator = torch.Generator().manual_seed(step)
    vocab = int(max(int(inputs.max()), int(targets.max()))) + 1
    noise = torch.randint(0, vocab, inputs.shape, generator=generator, dtype=inputs.dtype)
    return noise, torch.where(targets == IGNORE_INDEX, targets, torch.roll(noise, -1, dims=1))
