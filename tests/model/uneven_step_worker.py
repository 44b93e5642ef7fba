"""One rank of the uneven-split test (``python -m tests.model.uneven_step_worker CONFIG OUT``).

Runs step 1 of the bundled trainer (``model.train.Trainer``, through the worker API) on this
world size, then rank 0 writes the gathered full gradient and parameters after the update and
``OUT/ws<world size>-micro<micro_batch_size>.pt``; the step line (agreed loss) is on stdout.

Environment: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torch's env:// contract).
"""

from __future__ import annotations

import os
import sys

import torch
from torch.distributed.tensor import DTensor

import elastic.worker
from elastic.protocol import ExitCode
from elastic.worker.dist import exit_now
from model.config import resolve
from model.train import Trainer, run_config


def full(tensor: torch.Tensor) -> torch.Tensor:
    """COLLECTIVE for a DTensor: the whole tensor on every rank."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach().clone()
    return tensor.detach().clone()


def main(config: str, out_dir: str) -> int:
    job = resolve(config, environ={})
    run = elastic.worker.init(run_config(job), device="cpu", environ=os.environ)
    trainer = Trainer(job, run)
    for step in run.steps(1):
        trainer.train_step(step)
    named = list(trainer.model.named_parameters())
    grads = {name: full(p.grad) for name, p in named if p.grad is not None}
    params = {name: full(p) for name, p in named}
    if run.info.is_main:
        name = f"ws{run.info.world_size}-micro{job.train.micro_batch_size}.pt"
        torch.save({"grads": grads, "params": params}, f"{out_dir}/{name}")
    code = run.finish()
    return code if code == ExitCode.OK else ExitCode.FAILED


if __name__ == "__main__":
    exit_now(main(sys.argv[1], sys.argv[2]))  # no gloo teardown racing the peers' exits
