"""Your own training loop under elasticd: a char-level transformer on a bundled text.

The model, the dataset and the loop are this file's own (nothing of ``model/``); the lines
marked ``# elasticd`` are what the worker API (``elastic.worker``, docs/worker-api.md) costs.
For them the loop gets checkpoints that reshard to any world size, the exact data position after
any restart or resize, the divergence guard (skip, rewind and reshuffle), drain and pause at a
step boundary, hang detection, ``/metrics`` and ``elasticctl`` control, and the fault drills.
From the repository root, alone, under plain torchrun, and supervised by elasticd:

    python examples/byo/own_loop.py --config examples/byo/own_loop.yaml
    torchrun --standalone --nproc-per-node 2 examples/byo/own_loop.py --config (the same)
    elasticd run --config examples/byo/own_loop.yaml

Its settings are the ``train:`` section of the job config (:class:`TrainSettings`). The data of
step ``s`` comes from the API's :class:`~elastic.worker.ElasticSampler` (a pure function of the
seed, ``s`` and the run's data ledger), everything else the loop needs is tracked or derived from
``s``: that is what makes a restart at another world size, or a rewind, exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import elastic.worker  # elasticd

TEXT_PATH = Path(__file__).with_name("python-license.txt")  # Python's LICENSE.txt, as shipped


@dataclass(frozen=True)
class TrainSettings:
    """The ``train:`` section of the job config."""

    steps: int = 600
    global_batch_size: int = 16  # windows per step, over all ranks (divisible by world size)
    seq_len: int = 64  # characters per window
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    lr: float = 3e-3
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0  # model init and the sampler's permutations
    threads: int = 1  # torch intra-op threads per worker
    log_sample_ids: bool = False  # the step line carries the global dataset indices of the step

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> TrainSettings:
        known = [f.name for f in dataclasses.fields(cls)]
        for key, value in section.items():
            if key not in known:
                raise ValueError(f"train.{key}={value!r}: unknown key (known: {', '.join(known)})")
        settings = cls(**section)
        for key in ("steps", "global_batch_size", "seq_len", "d_model", "n_layer", "n_head"):
            if getattr(settings, key) <= 0:
                raise ValueError(f"train.{key}={getattr(settings, key)!r}: must be > 0")
        if settings.d_model % settings.n_head:
            raise ValueError(f"train.n_head={settings.n_head}: must divide d_model")
        return settings


class CharWindows(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Map-style: sample ``i`` is the window of ``seq_len + 1`` characters at ``i * stride``,
    as (input ids, next-character ids). Windows overlap by half."""

    def __init__(self, text: str, *, seq_len: int) -> None:
        self.vocab = sorted(set(text))
        index = {ch: i for i, ch in enumerate(self.vocab)}
        self.ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        self.seq_len, self.stride = seq_len, max(1, seq_len // 2)
        if len(self.ids) <= seq_len:
            raise ValueError(f"train.seq_len={seq_len}: the text has only {len(self.ids)} chars")

    def __len__(self) -> int:
        return (len(self.ids) - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.ids[i * self.stride : i * self.stride + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class CharTransformer(nn.Module):
    """A small pre-LN causal transformer over characters."""

    def __init__(self, vocab_size: int, settings: TrainSettings) -> None:
        super().__init__()
        d = settings.d_model
        self.tok_emb = nn.Embedding(vocab_size, d)
        self.pos_emb = nn.Embedding(settings.seq_len, d)
        layer = nn.TransformerEncoderLayer(
            d,
            settings.n_head,
            dim_feedforward=4 * d,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, settings.n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(t, device=ids.device))  # (B, T, d)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        x = self.blocks(x, mask=mask, is_causal=True)  # (B, T, d)
        return self.head(self.norm(x))  # (B, T, vocab)


def lr_at(settings: TrainSettings, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth at ``settings.steps``."""
    if step <= settings.warmup_steps:
        return settings.lr * step / max(1, settings.warmup_steps)
    progress = min(
        1.0, (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    )
    return settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*samples, strict=True)
    return torch.stack(inputs), torch.stack(targets)  # (B, T) each


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="own_loop.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="job config (default: the daemon's)")
    args = parser.parse_args(argv)

    run = elastic.worker.init(args.config, device="cpu")  # elasticd
    try:
        settings = TrainSettings.from_section(run.config.section("train"))  # elasticd
        dataset = CharWindows(TEXT_PATH.read_text(encoding="utf-8"), seq_len=settings.seq_len)
        sampler = run.sampler(  # elasticd
            len(dataset), global_batch_size=settings.global_batch_size, seed=settings.seed
        )
    except (TypeError, ValueError) as exc:  # the same on every rank: all of them stop
        print(f"own_loop: invalid config: {exc}", file=sys.stderr)
        return elastic.worker.ExitCode.CONFIG  # elasticd: the run stops (no restart)
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    model = CharTransformer(len(dataset.vocab), settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    run.track(model=model, optim=optimizer)  # elasticd
    ddp = DistributedDataParallel(model)  # gradients averaged over ranks: the global batch's

    for step in run.steps(settings.steps):  # elasticd: restores first, then the steps left
        inputs, targets = collate([dataset[i] for i in sampler.local_indices(step)])
        logits = ddp(inputs)  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        lr = lr_at(settings, step)
        extra = {"sample_ids": sampler.global_indices(step)} if settings.log_sample_ids else {}
        verdict = run.report(  # elasticd: one all-reduce; the guard's verdict
            loss=loss, grad_norm=grad_norm, tokens=targets.numel(), lr=lr, **extra
        )
        if verdict.apply:  # elasticd
            for group in optimizer.param_groups:
                group["lr"] = lr * verdict.lr_scale  # elasticd: rewind damping, lr_spike drill
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run.finish()  # elasticd: 0 done, 4 drained, 3 diverged


if __name__ == "__main__":
    raise SystemExit(main())
