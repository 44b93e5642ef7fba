"""One rank of the resharding test (run as ``python -m tests.elastic.checkpoint.reshard_worker``).

Phases (argv[1]):

- ``save``: train a toy FSDP2 model 2 steps, save step 2 (sync), train step 3, save step 3
  (async when argv[3] == "async", copied in the background), and write the gathered full
  state of both to ``ref-<step>.pt``.
- ``load``: build a fresh model at this world size, load (step argv[4] or the newest), write the
  gathered full state to ``got-<ws>.pt``; then train one more step and write ``next-<ws>.pt``.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torch's env:// contract).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from elastic import jsonlog
from elastic.checkpoint import CheckpointConfig, CheckpointManager, app_state, restore_app_state
from model import distributed

GLOBAL_BATCH = 6  # divisible by every world size the test uses (1, 2, 3)


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    # Odd sizes so dim-0 shards are uneven at world size 2 and 3; the 4001-wide layer's shards
    # are large enough to be streamed into place (elastic/checkpoint/streamed.py), and at
    # another world size each destination takes part of a saved shard.
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 10),
        torch.nn.ReLU(),
        torch.nn.Linear(10, 4001),
        torch.nn.ReLU(),
        torch.nn.Linear(4001, 7),
        torch.nn.ReLU(),
        torch.nn.Linear(7, 3),
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 3, generator=gen)
    rank, ws = dist.get_rank(), dist.get_world_size()
    per = GLOBAL_BATCH // ws
    xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    loss = torch.nn.functional.mse_loss(model(xs), ys)
    loss.backward()
    opt.step()
    opt.zero_grad()


def full(obj: Any) -> Any:
    """Gather DTensors into full tensors (collective), recursively."""
    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: full(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(full(v) for v in obj)
    return obj


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"app": full(app_state(model, opt)), "rng": torch.get_rng_state().clone()}


def manager(url: str, *, async_save: bool) -> CheckpointManager:
    config = CheckpointConfig(url=url, interval_steps=1, keep_last=3, async_save=async_save)
    return CheckpointManager(
        config, run_id="reshard", rank=dist.get_rank(), world_size=dist.get_world_size()
    )


def save_phase(url: str, out_dir: str, *, async_save: bool) -> None:
    model, opt = build(seed=0)
    torch.manual_seed(42)  # the rng state must be identical on all ranks
    ckpt = manager(url, async_save=async_save)
    for step in (1, 2):
        train_step(model, opt, step)
    ref2 = snapshot(model, opt)
    ckpt.save(2, {**app_state(model, opt), "rng": torch.get_rng_state()}, meta={"data": 2})
    train_step(model, opt, 3)
    ref3 = snapshot(model, opt)
    state = {**app_state(model, opt), "rng": torch.get_rng_state()}
    # Step 3 copies in the background (async only); the trainer waits before it mutates.
    ckpt.save(3, state, meta={"data": 3}, background_staging=async_save)
    ckpt.wait_staged()
    # Mutating the live state after an async save returned must not reach the checkpoint.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ckpt.close()
    if dist.get_rank() == 0:
        torch.save(ref2, os.path.join(out_dir, "ref-2.pt"))
        torch.save(ref3, os.path.join(out_dir, "ref-3.pt"))


def load_phase(url: str, out_dir: str, step: int | None) -> None:
    model, opt = build(seed=7)
    ckpt = manager(url, async_save=False)
    state = {**app_state(model, opt), "rng": torch.zeros_like(torch.get_rng_state())}
    used = ckpt.load(state, step=step)
    assert used is not None
    restore_app_state(model, opt, state)
    torch.set_rng_state(state["rng"])
    got = snapshot(model, opt)
    train_step(model, opt, used.step + 1)
    nxt = snapshot(model, opt)
    ckpt.close()
    if dist.get_rank() == 0:
        ws = dist.get_world_size()
        meta = {"step": used.step, "world_size_saved": used.world_size, "meta": used.meta}
        torch.save({"got": got, "meta": meta}, os.path.join(out_dir, f"got-{ws}.pt"))
        torch.save(nxt, os.path.join(out_dir, f"next-{ws}.pt"))


def main(argv: list[str]) -> None:
    phase, url, out_dir = argv[1], argv[2], argv[3]
    jsonlog.configure(rank=int(os.environ["RANK"]))
    dist.init_process_group("gloo")
    if phase == "save":
        save_phase(url, out_dir, async_save=argv[4] == "async")
    else:
        load_phase(url, out_dir, int(argv[4]) if argv[4] != "latest" else None)
    distributed.shutdown(clean=True)


if __name__ == "__main__":
    main(sys.argv)
    distributed.exit_now(0)  # as model.train: no gloo teardown (it races with exiting peers)
