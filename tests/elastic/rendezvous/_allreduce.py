"""Training-script stand-in for the torchrun test: one gloo all_reduce, checked, then exit 0."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from model import distributed


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tensor = torch.tensor([float(rank + 1)])
    dist.all_reduce(tensor)
    expected = world_size * (world_size + 1) / 2
    assert tensor.item() == expected, (tensor.item(), expected)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    record = {"event": "all_reduce", "rank": rank, "world_size": world_size, "restart": restart}
    print(json.dumps({**record, "sum": tensor.item()}), flush=True)
    distributed.shutdown(clean=True)


if __name__ == "__main__":
    main()
    distributed.exit_now(0)  # as model.train: no gloo teardown (it races with exiting peers)
