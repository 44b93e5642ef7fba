"""A plain DDP training script that knows nothing of elasticd (it imports none of it).

It is written the way torchrun scripts usually are: the process group from the torch elastic
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), its own
``torch.save`` checkpoints, one JSON line per step on stdout. Run it

    python examples/byo/plain.py --checkpoint-dir /tmp/plain            # alone, one process
    torchrun --standalone --nproc-per-node 2 examples/byo/plain.py      # plain torchrun
    elasticd run --config examples/byo/plain.yaml                       # supervised

What elasticd gives it without a line of integration: a restart of the whole group after any
worker fails or a node is lost or added (a fresh process group, maybe another world size), and
the script resumes from its newest checkpoint; its ``step`` lines feed the node's ``/metrics``.
What it does not get (that needs the worker API, see own_loop.py): drain and pause at a step
boundary, hang detection by heartbeat, the divergence guard, resharded state and an exact data
position (here the data of step ``s`` is simply a function of ``s``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
NUM_FEATURES = 16


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plain.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint-dir",
        default=os.environ.get("PLAIN_CHECKPOINT_DIR", "./runs/plain/checkpoints"),
        help="where rank 0 writes step-<N>.pt (env PLAIN_CHECKPOINT_DIR); shared by all nodes",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoint-every", type=int, default=25, help="steps between saves")
    parser.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def init_process_group() -> tuple[int, int]:
    """(rank, world size): from the torchrun/elasticd environment, else one process alone."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo")  # env:// reads RANK, WORLD_SIZE, MASTER_ADDR/PORT
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def build_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP broadcasts anyway)
    return torch.nn.Sequential(
        torch.nn.Linear(NUM_FEATURES, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )


def batch(step: int, *, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: synthetic regression, a pure function of (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(size, NUM_FEATURES, generator=gen)  # (B, F)
    target = torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.1 * x[:, 4:5]  # (B, 1)
    return x, target


def newest_checkpoint(directory: Path) -> Path | None:
    """The highest ``step-<N>.pt``; half-written files (``*.tmp``) never match."""
    steps = checkpoint_steps(directory)
    return directory / f"step-{steps[-1]}.pt" if steps else None


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the committed checkpoints in ``directory``, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(m[1]) for p in directory.iterdir() if (m := CHECKPOINT_NAME.match(p.name)))


def save(directory: Path, step: int, state: dict[str, Any], *, keep: int) -> Path:
    """Rank 0 only: write, then rename into place, so a kill mid-write leaves no torn file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step}.pt"
    tmp = directory / f".step-{step}.pt.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in checkpoint_steps(directory)[:-keep]:
        (directory / f"step-{old}.pt").unlink(missing_ok=True)
    return path


def log(**fields: Any) -> None:
    print(json.dumps({"ts": round(time.time(), 3), **fields}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world_size = init_process_group()
    if args.global_batch_size % world_size:
        raise SystemExit(
            f"--global-batch-size={args.global_batch_size}: not divisible by {world_size}"
        )
    local = args.global_batch_size // world_size
    mine = slice(rank * local, (rank + 1) * local)  # this rank's share of each global batch
    model = build_model(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    directory = Path(args.checkpoint_dir)
    step = resume(directory, model, optimizer)
    ddp = DistributedDataParallel(model)  # gradients averaged over ranks: the global batch's
    if rank == 0:
        log(event="start", resumed_from=step or None, world_size=world_size)

    while step < args.steps:
        step += 1
        x, target = batch(step, seed=args.seed, size=args.global_batch_size)
        loss = F.mse_loss(ddp(x[mine]), target[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dist.all_reduce(mean := loss.detach().clone())  # for the step line only
        if rank == 0:
            log(event="step", step=step, loss=mean.item() / world_size, world_size=world_size)
        if rank == 0 and (step % args.checkpoint_every == 0 or step == args.steps):
            state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}
            path = save(directory, step, state, keep=args.keep)
            log(event="checkpoint_commit", step=step, path=str(path))
    if rank == 0:
        log(event="done", step=step)
    dist.barrier()  # rank 0 hosts the store: nobody leaves while a peer may still need it
    return 0


def resume(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the newest checkpoint into ``model`` and ``optimizer``: the step it holds (0: none).

    Every rank reads the same newest file: rank 0 writes no checkpoint before the first step's
    all-reduce, which it cannot pass before every rank has loaded."""
    newest = newest_checkpoint(directory)
    if newest is None:
        return 0
    state = torch.load(newest, map_location="cpu")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    return int(state["step"])


if __name__ == "__main__":
    code = main()
    # Leave now, without tearing the gloo group down (no destroy_process_group): in torch 2.13
    # its destructor joins gloo's worker thread while holding the GIL that thread may still
    # need (a deadlock, seen in about 1 of 7 two-rank exits under elasticd's launcher), or
    # aborts while a peer exits too. Everything durable (checkpoints, log lines) is written.
    sys.stdout.flush()
    os._exit(code)
