"""FSDP2 sharding of the bundled GPT. Process-group set-up lives in the worker API
(:mod:`elastic.worker.dist`), as for any loop; its names are re-exported here for the trainer.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from elastic.worker.dist import DistInfo, exit_now, init, shutdown, sum_across_ranks

__all__ = ["DistInfo", "exit_now", "init", "shard", "shutdown", "sum_across_ranks"]


def shard(model: torch.nn.Module, blocks: torch.nn.ModuleList, *, bf16: bool) -> None:
    """FSDP2: each transformer block is one shard unit, the root takes the rest."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
