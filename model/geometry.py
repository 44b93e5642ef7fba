"""The batch geometry of a job: which world sizes can train its fixed global batch.

A pure check of the config (no data opened, no torch): every data stage's global batch of
``train.global_batch_tokens // seq_len`` samples splits over any world size with at least one
sample per rank (:mod:`elastic.worker.split`: uneven slices, equal micro-batch counts). So the
one constraint is a world size larger than the smallest stage batch. ``python -m model.config
--check`` (run by the daemon at start) checks the whole elastic range ``nodes.min..nodes.max``
x ``nproc_per_node`` and names every world size that cannot work; a worker checks its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elastic.config import ConfigError
from elastic.worker.split import unworkable_world_sizes

if TYPE_CHECKING:
    from model.config import JobConfig


@dataclass(frozen=True)
class StageBatch:
    start_step: int
    seq_len: int
    num_samples: int  # samples in the global batch of each step of the stage


def stage_batches(job: JobConfig) -> list[StageBatch]:
    """The global batch of each data stage (the base stage from step 0 included)."""
    seq_lens = {0: job.train.seq_len}
    for stage in job.data.stages:
        seq_lens[stage.start_step] = stage.seq_len or job.train.seq_len
    tokens = job.train.global_batch_tokens
    return [StageBatch(start, n, tokens // n) for start, n in sorted(seq_lens.items())]


def elastic_world_sizes(job: JobConfig) -> range:
    """World sizes the daemon may form: ``nodes.min..nodes.max`` x ``nproc_per_node``."""
    low, high = int(job.nodes.get("min", 1)), int(job.nodes.get("max", 1))
    return range(low * job.nproc_per_node, high * job.nproc_per_node + 1, job.nproc_per_node)


def check_world_sizes(job: JobConfig, world_sizes: Sequence[int]) -> None:
    """ConfigError naming ``train.global_batch_tokens`` and every world size that leaves a
    rank without a sample in some stage."""
    for stage in stage_batches(job):
        bad = unworkable_world_sizes(stage.num_samples, list(world_sizes))
        if stage.num_samples == 0 or bad:
            raise ConfigError(
                f"train.global_batch_tokens={job.train.global_batch_tokens}: "
                f"{stage.num_samples} samples of {stage.seq_len} tokens per step (from step "
                f"{stage.start_step}) leave a rank without a sample at world sizes {bad}"
                f"{_range_note(job, world_sizes)}; need at least one sample per rank"
            )


def _range_note(job: JobConfig, world_sizes: Sequence[int]) -> str:
    if list(world_sizes) != list(elastic_world_sizes(job)):
        return ""
    nodes = f"{job.nodes.get('min', 1)}..{job.nodes.get('max', 1)}"
    return f" (nodes {nodes} x nproc_per_node={job.nproc_per_node})"
