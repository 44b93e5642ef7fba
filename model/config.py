"""The job configuration document as a worker sees it, and `python -m model.config --check`.

One YAML document configures a whole run (docs/architecture.md). The sections a worker needs are
typed here; the daemon-only sections (``nodes``, ``etcd``, ``watchdog``, ``drain``, ``metrics``,
``nproc_per_node``, ``worker``, ``stragglers``) are kept as opaque mappings, validated by the
daemon. The daemon cannot import this package, so it validates ``model``/``data``/``train``
by running ``python -m model.config --check FILE`` (no torch import: fast).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from elastic.checkpoint.config import CheckpointConfig, storage_protocol_problem
from elastic.config import ConfigError, build, check, check_name, layered, to_dict
from elastic.faults import FaultConfig, require_permission
from elastic.guard.config import GuardConfig, RewindConfig
from model.data_config import DataConfig
from model.geometry import check_world_sizes, elastic_world_sizes
from model.gpt import GPTConfig
from model.shards import is_local

# torch.set_num_threads takes a C int; no host has more hardware threads than this.
MAX_THREADS = 1024


@dataclass(frozen=True)
class TrainConfig:
    """YAML section ``train``: optimisation and loop settings."""

    steps: int = 300  # total optimizer steps of the run
    global_batch_tokens: int = 8192  # fixed whatever the world size
    micro_batch_size: int = 4  # samples per rank per micro-step (accumulation fills the rest)
    seq_len: int = 128  # tokens per sample (a data stage may override it)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234  # model init seed
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each block and the loss (GPT.compile_regions)
    log_sample_ids: bool = False  # add the global batch's sample ids to each step line
    threads: int = 0  # torch intra-op threads per worker (0 = leave torch's default)
    # Dense peak FLOP/s of one device, for MFU; 0: from the worker API's table of known GPUs.
    peak_flops_per_device: float = 0.0

    def __post_init__(self) -> None:
        for key in ("steps", "global_batch_tokens", "micro_batch_size", "seq_len"):
            value = getattr(self, key)
            check(value > 0, key, value, "must be > 0")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, "must be in [0, lr]")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        for key in ("beta1", "beta2"):  # AdamW refuses anything else when it is built
            check(0 <= getattr(self, key) < 1, key, getattr(self, key), "must be in [0, 1)")
        check(self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0")
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        threads_ok = 0 <= self.threads <= MAX_THREADS
        check(threads_ok, "threads", self.threads, f"must be in 0..{MAX_THREADS}")
        check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "auto, cpu or cuda")
        peak = self.peak_flops_per_device
        check(peak >= 0, "peak_flops_per_device", peak, "must be >= 0")


@dataclass(frozen=True)
class JobConfig:
    """The whole document, worker view."""

    run_id: str = "demo"
    run_dir: str = "./runs/demo"
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    rewind: RewindConfig = field(default_factory=RewindConfig)
    faults: tuple[FaultConfig, ...] = ()
    # Daemon-owned sections, validated by the daemon.
    nodes: dict[str, Any] = field(default_factory=dict)
    nproc_per_node: int = 1
    etcd: dict[str, Any] = field(default_factory=dict)
    watchdog: dict[str, Any] = field(default_factory=dict)
    drain: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    worker: dict[str, Any] = field(default_factory=dict)
    stragglers: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("run_id", self.run_id)
        check(bool(self.run_dir), "run_dir", self.run_dir, "must not be empty")
        check(self.nproc_per_node > 0, "nproc_per_node", self.nproc_per_node, "must be > 0")
        for i, source in enumerate(self.data.sources):
            problem = None if is_local(source.url) else storage_protocol_problem(source.url)
            check(problem is None, f"data.sources[{i}].url", source.url, problem or "")


def resolve(
    path: str | None,
    *,
    environ: Mapping[str, str],
    sets: Sequence[str] = (),
) -> JobConfig:
    """defaults < YAML < env < --set, validated; faults need ``ELASTICD_ALLOW_FAULTS=1``."""
    job = build(JobConfig, layered(path, environ=environ, sets=sets))
    require_permission(job.faults, environ)
    return job


def check_workload(document: Mapping[str, Any], *, environ: Mapping[str, str]) -> JobConfig:
    """What ``--check`` validates (the daemon, at start): the document, fault permission, and
    every world size of the elastic range ``nodes.min..nodes.max`` x ``nproc_per_node``."""
    job = build(JobConfig, document)
    require_permission(job.faults, environ)
    check_world_sizes(job, elastic_world_sizes(job))
    return job


def dump(job: JobConfig) -> str:
    return yaml.safe_dump(to_dict(job), sort_keys=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.config")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--check", action="store_true", help="validate only")
    args = parser.parse_args(argv)
    try:
        if args.check:
            document = layered(args.config, environ=os.environ, sets=args.sets)
            job = check_workload(document, environ=os.environ)
        else:
            job = resolve(args.config, environ=os.environ, sets=args.sets)
    except ConfigError as exc:
        print(f"elasticd: invalid config: {exc}", file=sys.stderr)
        return 2
    if not args.check:
        sys.stdout.write(dump(job))
    return 0


if __name__ == "__main__":
    sys.exit(main())
