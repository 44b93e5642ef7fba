"""Training-script stand-in for the torchrun tests: a gloo all_reduce, checked, then exit 0.

Every line it prints is one JSON object. Two switches, read from the environment (torchrun's
workers inherit the agent's):

- ``ALLREDUCE_FAIL_ONCE=1``: on the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0; a
  membership change does not count as a restart) exit 1 before joining the process group;
- ``ALLREDUCE_HOLD_FILE=<path>``: a worker that finds no ``path`` after its all_reduce waits for
  it, then all_reduces again (a peer gone meanwhile makes that raise: the worker fails); a
  worker started after ``path`` appeared all_reduces once.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from model import distributed

HOLD_SECONDS = 60.0
COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a dead peer must not hang the test for 30 min


def emit(**record: object) -> None:
    print(json.dumps(record), flush=True)


def all_reduce(restart: str | None) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tensor = torch.tensor([float(rank + 1)])
    dist.all_reduce(tensor)
    expected = world_size * (world_size + 1) / 2
    assert tensor.item() == expected, (tensor.item(), expected)
    emit(
        event="all_reduce",
        rank=rank,
        world_size=world_size,
        restart=restart,
        pid=os.getpid(),
        sum=tensor.item(),
    )


def hold(path: Path) -> None:
    deadline = time.monotonic() + HOLD_SECONDS
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {HOLD_SECONDS} s"
        time.sleep(0.05)


def main() -> int:
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    emit(event="started", restart=restart, pid=os.getpid())  # the test kills leftovers by pid
    first_attempt = restart == "0"
    if first_attempt and os.environ.get("ALLREDUCE_FAIL_ONCE") == "1":
        emit(event="failing", restart=restart)
        return 1
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    all_reduce(restart)
    hold_file = os.environ.get("ALLREDUCE_HOLD_FILE")
    if hold_file and not Path(hold_file).exists():
        hold(Path(hold_file))
        all_reduce(restart)
    distributed.shutdown(clean=True)
    return 0


if __name__ == "__main__":
    distributed.exit_now(main())  # as model.train: no gloo teardown (it races with exiting peers)
