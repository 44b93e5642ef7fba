"""Process-group set-up for a worker: the env contract, the device, teardown, the one reduce.

Workers are started by the elasticd daemon or by plain torchrun; both provide the torch elastic
env contract (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
Started by hand with no such env, a worker forms a one-process group on an in-memory store, so
the same code path (DTensor parameters, DCP checkpoints, collectives) runs everywhere.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(environ: Mapping[str, str], *, device_preference: str = "auto") -> DistInfo:
    """Join the process group described by ``environ`` (or a one-process group).

    An already initialised default group (the loop set it up itself) is used as it is.
    """
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        backend = str(dist.get_backend())
    elif "RANK" in environ and "MASTER_ADDR" in environ:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=COLLECTIVE_TIMEOUT
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown(*, clean: bool) -> None:
    """Leave the group. After a clean finish every rank meets at a barrier, so no rank exits
    while a peer still needs it (rank 0 hosts the store). The group is not destroyed: gloo's
    teardown races with peers that exit at the same moment (aborts and segfaults seen here),
    and the process exits right after (:func:`exit_now`).

    After a failure, do nothing: the group is broken, and the daemon is waiting for this
    process to exit to restart the round.
    """
    if clean and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def exit_now(code: int) -> NoReturn:
    """Flush stdout and stderr and exit with ``code``, skipping interpreter and C++ teardown:
    gloo's destructors race with peers exiting at the same moment (``terminate called without
    an active exception``, SIGABRT). Call it once everything durable is written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def sum_across_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """One small all-reduce (float64) that every rank leaves with the identical result."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]
