"""The deterministic mixture sampler: which token windows make up the batch of step ``s``.

The key property: the global batch of training step ``s`` is a pure function of
``(seed, stage, data step, salt)``, computable in O(batch) without replaying history, and the
same whatever the world size; a data-parallel rank takes its contiguous slice (sizes may differ
by one sample, :mod:`elastic.worker.split`). So a run resumed from a checkpoint at any world
size sees exactly the samples it would have seen.

How one global batch is drawn:

- The stage of step ``s`` is the last stage whose ``start_step <= s``; stage 0 is the base
  ``sources`` weights unless a configured stage starts at 0. The stage fixes the mixture weights
  and ``seq_len``; the batch holds ``global_batch_tokens // seq_len`` samples.
- A counter-based generator (numpy Philox keyed through ``SeedSequence((seed, stage index,
  data step, salt))``) yields two raw 64-bit words per sample: the first picks the source by
  inverse CDF over the stage weights, the second a uniform token offset in that source's training
  split. Only ``random_raw`` is used, whose stream numpy keeps stable across releases.
- A sample is ``seq_len + 1`` tokens from ``offset``: inputs are the first ``seq_len``, targets
  the last ``seq_len``. Windows may cross document boundaries (EOS separates documents).

The data ledger (:class:`~elastic.worker.ledger.DataLedger`, shared with the worker API's sampler)
maps a training step to its ``(data step, salt)``: reshuffled or skipped windows after rewinds.

Sample ids (``Sample.sample_id``) are unique and stable: ``salt << 52 | data_step << 20 |
position``, so at most 2**20 samples per batch, 2**32 data steps and 2**11 salts; reshuffled
samples never share an id with the originals.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from elastic.worker.ledger import DataLedger
from elastic.worker.split import BatchSplit
from model.data_config import DataConfig
from model.gpt import IGNORE_INDEX
from model.shards import ShardNotFound, TokenShard, open_shard, resolve_shard_url

POSITION_BITS = 20
STEP_BITS = 32


@dataclass(frozen=True)
class Sample:
    sample_id: int
    source: str
    offset: int  # first token of the window in the source's shard


@dataclass(frozen=True)
class Stage:
    start_step: int
    weights: dict[str, float]  # normalised to sum 1; every source of the sampler is listed
    seq_len: int


def normalised(weights: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    total = sum(weights.get(n, 0.0) for n in names)
    if total <= 0:
        raise ValueError(f"weights={dict(weights)!r}: need at least one weight > 0")
    return {n: weights.get(n, 0.0) / total for n in names}


@dataclass
class _StageTable:
    stage: Stage
    cdf: np.ndarray  # (num_sources,) float64, last entry exactly 1.0
    active: list[int] = field(default_factory=list)  # source indices with weight > 0


class Sampler:
    """Global and per-rank batches of any step, plus held-out eval batches per source."""

    def __init__(
        self,
        shards: Mapping[str, TokenShard],
        *,
        stages: Sequence[Stage],
        seed: int,
        global_batch_tokens: int,
        ledger: DataLedger | None = None,
    ) -> None:
        if not shards:
            raise ValueError("data.sources: no source to sample from")
        if not stages or stages[0].start_step != 0:
            raise ValueError("stages: the first stage must start at step 0")
        if global_batch_tokens <= 0:
            raise ValueError(f"train.global_batch_tokens={global_batch_tokens}: must be > 0")
        self.shards = dict(shards)
        self.names = list(self.shards)
        self.seed = seed
        self.global_batch_tokens = global_batch_tokens
        self.ledger = ledger or DataLedger()
        self._starts = [s.start_step for s in stages]
        self._tables = [self._table(stage) for stage in stages]
        _check_same_tokenizer(self.shards)

    def _table(self, stage: Stage) -> _StageTable:
        unknown = set(stage.weights) - set(self.names)
        if unknown:
            raise ValueError(f"stage at step {stage.start_step}: unknown sources {sorted(unknown)}")
        if self.global_batch_tokens < stage.seq_len:
            raise ValueError(
                f"train.global_batch_tokens={self.global_batch_tokens}: smaller than one sample "
                f"of seq_len={stage.seq_len}"
            )
        weights = np.array([stage.weights.get(n, 0.0) for n in self.names], dtype=np.float64)
        active = [i for i, w in enumerate(weights) if w > 0]
        for i in active:
            shard = self.shards[self.names[i]]
            if shard.index.train_tokens < stage.seq_len + 1:
                raise ValueError(
                    f"data source {self.names[i]!r}: {shard.index.train_tokens} training tokens, "
                    f"fewer than seq_len + 1 = {stage.seq_len + 1}"
                )
        cdf = np.cumsum(weights / weights.sum())
        cdf[-1] = 1.0  # rounding must never leave a draw past the last source
        return _StageTable(stage=stage, cdf=cdf, active=active)

    @property
    def vocab_size(self) -> int:
        """The shards' vocabulary size; the model's ``vocab_size`` must be at least this."""
        return next(iter(self.shards.values())).index.vocab_size

    def with_ledger(self, ledger: DataLedger) -> Sampler:
        """The same sampler reading through another ledger (shards are shared, not reopened)."""
        clone = object.__new__(Sampler)
        clone.__dict__.update(self.__dict__)
        clone.ledger = ledger
        return clone

    # ---------------------------------------------------------------- schedule
    def stage_index(self, step: int) -> int:
        return bisect.bisect_right(self._starts, step) - 1 if step >= 0 else 0

    def stage(self, step: int) -> Stage:
        return self._tables[self.stage_index(step)].stage

    def weights_at(self, step: int) -> dict[str, float]:
        return dict(self.stage(step).weights)

    def seq_len_at(self, step: int) -> int:
        return self.stage(step).seq_len

    def batch_size(self, step: int) -> int:
        """Samples in the global batch of ``step``: global_batch_tokens // seq_len (floor)."""
        return self.global_batch_tokens // self.seq_len_at(step)

    # ---------------------------------------------------------------- training batches
    def global_batch(self, step: int) -> list[Sample]:
        """The samples of training step ``step``, in global order (rank 0's slice first)."""
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        stage_index = self.stage_index(step)
        table = self._tables[stage_index]
        data_step, salt = self.ledger.resolve(step)
        size = self.batch_size(step)
        if size > 2**POSITION_BITS or data_step >= 2**STEP_BITS:
            raise ValueError(f"step={step}: batch of {size} samples or data step out of range")
        raw = _raw_words(self.seed, stage_index, data_step, salt, count=2 * size)
        uniform = (raw[0::2] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # (size,) in [0, 1)
        picks = np.searchsorted(table.cdf, uniform, side="right")  # (size,)
        samples = []
        base_id = (salt << (STEP_BITS + POSITION_BITS)) | (data_step << POSITION_BITS)
        for position, (pick, word) in enumerate(zip(picks, raw[1::2], strict=True)):
            name = self.names[int(pick)]
            span = self.shards[name].index.train_tokens - table.stage.seq_len  # offsets 0..span-1
            samples.append(Sample(base_id | position, name, int(word % np.uint64(span))))
        return samples

    def local_batch(
        self, step: int, *, dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """This rank's contiguous slice of the global batch, as micro-batches.

        Each item is ``(inputs (micro, T) int64, targets (micro, T) int64, sample_ids)``. The
        split is :class:`~elastic.worker.split.BatchSplit`'s: slices differ by at most one sample
        and every rank gets the same number of micro-batches. A padding micro-batch (a slice
        shorter than the count, ``micro_batch_size=1`` only) is one window of token 0 whose
        targets are all ``IGNORE_INDEX``, with no sample ids: it adds exactly 0 to the loss.
        """
        samples = self.global_batch(step)
        if not 0 <= dp_rank < dp_size or micro_batch_size <= 0:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}, micro={micro_batch_size}")
        if len(samples) < dp_size:
            raise ValueError(
                f"train.global_batch_tokens={self.global_batch_tokens}: {len(samples)} samples "
                f"of {self.seq_len_at(step)} tokens at step {step} leave a rank of "
                f"dp_size={dp_size} without a sample"
            )
        split = BatchSplit(len(samples), dp_size, micro_batch_size)
        seq_len = self.seq_len_at(step)
        return [
            self._windows(samples[part.start : part.stop], seq_len)
            for part in split.micro_slices(dp_rank)
        ]

    def _windows(
        self, chunk: list[Sample], seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        if not chunk:
            padding = torch.zeros((1, seq_len), dtype=torch.int64)
            return padding, torch.full_like(padding, IGNORE_INDEX), []
        windows = np.stack(
            [self.shards[s.source].window(s.offset, seq_len + 1) for s in chunk]
        )  # (micro, T + 1)
        tokens = torch.from_numpy(windows)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), [s.sample_id for s in chunk]

    # ---------------------------------------------------------------- evaluation
    def eval_batch(
        self, source: str, *, index: int, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of consecutive, non-overlapping windows of the held-out split.

        Deterministic; wraps around when the split holds fewer windows than asked for.
        """
        shard = self.shards[source]
        num_windows = (shard.index.heldout_tokens - 1) // seq_len
        if num_windows < 1:
            raise ValueError(
                f"data source {source!r}: held-out split of {shard.index.heldout_tokens} tokens "
                f"is shorter than seq_len + 1 = {seq_len + 1}"
            )
        rows = []
        for b in range(batch_size):
            window = (index * batch_size + b) % num_windows
            rows.append(shard.window(shard.index.heldout_start + window * seq_len, seq_len + 1))
        tokens = torch.from_numpy(np.stack(rows))  # (batch, T + 1)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def describe(self) -> dict[str, Any]:
        """Sources, sizes and stages, for the run's start-up log line."""
        return {
            "sources": {
                n: {"num_tokens": s.index.num_tokens, "tokenizer": s.index.tokenizer, "url": s.url}
                for n, s in self.shards.items()
            },
            "stages": [
                {"start_step": t.stage.start_step, "seq_len": t.stage.seq_len, **t.stage.weights}
                for t in self._tables
            ],
            "ledger_entries": len(self.ledger.entries),
        }


def _raw_words(seed: int, stage: int, data_step: int, salt: int, *, count: int) -> np.ndarray:
    """``count`` uint64 words, a pure function of the key (no generator state is carried)."""
    bit_generator = np.random.Philox(np.random.SeedSequence([seed, stage, data_step, salt]))
    return bit_generator.random_raw(count)  # type: ignore[no-any-return]


def _check_same_tokenizer(shards: Mapping[str, TokenShard]) -> None:
    kinds = {(s.index.tokenizer, s.index.vocab_size) for s in shards.values()}
    if len(kinds) > 1:
        found = {n: s.index.tokenizer for n, s in shards.items()}
        raise ValueError(f"data.sources: shards use different tokenizers {found}")


# -------------------------------------------------------------------- from configuration
def source_urls(config: DataConfig, *, run_dir: str) -> dict[str, tuple[str, float]]:
    """``name -> (shard url, base weight)``; builds the demo corpus when the config uses it."""
    if config.uses_demo:
        from model.prepare import demo_weights, ensure_demo  # only demo runs pay for corpus code

        root = config.demo_path(run_dir)
        ensure_demo(root)
        return {n: (f"{root}/{n}", w) for n, w in demo_weights(root).items()}
    urls = {}
    for i, source in enumerate(config.sources):
        try:
            url = resolve_shard_url(source.url, source.name, storage_options=config.storage_options)
        except ShardNotFound as exc:
            # A user error like a missing path: name the key, as config validation does.
            raise ValueError(f"data.sources[{i}].url={source.url!r}: {exc}") from exc
        urls[source.name] = (url, source.weight)
    return urls


def build_sampler(
    config: DataConfig,
    *,
    run_dir: str,
    seq_len: int,
    global_batch_tokens: int,
    ledger: DataLedger | None = None,
) -> Sampler:
    """Open the configured (or demo) shards and the stage table; ``seq_len`` = train.seq_len."""
    urls = source_urls(config, run_dir=run_dir)
    names = list(urls)
    stages = []
    if not any(s.start_step == 0 for s in config.stages):
        base = normalised({n: w for n, (_, w) in urls.items()}, names)
        stages.append(Stage(start_step=0, weights=base, seq_len=seq_len))
    for i, stage in enumerate(config.stages):
        unknown = sorted(set(stage.weights) - set(names))
        if unknown:
            raise ValueError(f"data.stages[{i}].weights: sources {unknown} are not available")
        stages.append(
            Stage(
                start_step=stage.start_step,
                weights=normalised(stage.weights, names),
                seq_len=stage.seq_len or seq_len,
            )
        )
    options = config.storage_options
    shards = {n: open_shard(url, storage_options=options) for n, (url, _) in urls.items()}
    return Sampler(
        shards,
        stages=stages,
        seed=config.seed,
        global_batch_tokens=global_batch_tokens,
        ledger=ledger,
    )
