"""An elastic, deterministic sampler for map-style datasets (``dataset[i]``, ``len(dataset)``).

The dataset indices of global step ``s`` are a pure function of ``(seed, s, data ledger)``,
computed without replaying history, and the same whatever the world size; rank ``r`` of ``n``
takes the ``r``-th contiguous slice (:mod:`elastic.worker.split`: ``B // n`` or ``B // n + 1``
indices, the first ``B % n`` ranks one more, so any batch of at least ``n`` samples splits).
So a run resumed at any step, at any world size, sees exactly the samples it would have seen,
and an interrupted run's multiset of samples equals an uninterrupted one's.

How: the data ledger maps training step ``s`` to ``(data step d, salt)``
(:class:`~elastic.worker.ledger.DataLedger`: skipped windows move ``d`` forward, reshuffled
ones get a fresh salt). With salt 0, step ``d`` takes positions ``d*B .. d*B+B-1`` of an endless
stream of epochs, each a fresh permutation of ``range(len(dataset))`` keyed by
``(seed, epoch)``: every sample once per epoch. A reshuffled step (salt > 0) draws ``B``
distinct indices from a permutation keyed by ``(seed, d, salt)``: other samples, reproducibly.
Permutations come from numpy's Philox (a counter-based generator, stable across releases);
the last epoch's permutation is cached.

A run's sampler reports each step's local draw (``on_draw``, called by :meth:`local_indices`
and :meth:`local_micro_batches`, not by :meth:`global_indices`) to the run's data chain, and
:meth:`describe` is what the audit (:mod:`ops.audit`) rebuilds it from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from elastic.worker.ledger import DataLedger
from elastic.worker.split import BatchSplit

EPOCH_DOMAIN = 0  # SeedSequence key spaces: epoch permutations and reshuffled draws apart
RESHUFFLE_DOMAIN = 1
KIND = "elastic"  # describe()'s kind


class ElasticSampler:
    def __init__(
        self,
        num_samples: int,
        *,
        global_batch_size: int,
        seed: int = 0,
        ledger: Callable[[], DataLedger] = DataLedger,
        rank: int = 0,
        world_size: int = 1,
        on_draw: Callable[[int, list[int]], None] | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples={num_samples}: must be > 0")
        if global_batch_size <= 0 or global_batch_size > num_samples:
            raise ValueError(
                f"global_batch_size={global_batch_size}: must be in 1..num_samples ({num_samples})"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if global_batch_size < world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size}: fewer samples than ranks "
                f"(world size {world_size}): a rank would get none"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._ledger = ledger
        self._on_draw = on_draw  # (step, this rank's indices of it): the run's data chain
        self._epoch: tuple[int, np.ndarray] | None = None

    @property
    def local_batch_size(self) -> int:
        """This rank's share of a step: ``B // n`` or one more (ranks may differ by one)."""
        return len(self._split(1).rank_slice(self.rank))

    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of training step ``step`` (1-based), in global order."""
        if step < 1:
            raise ValueError(f"step={step}: steps count from 1")
        data_step, salt = self._ledger().resolve(step)
        if salt:
            drawn = self._permutation(RESHUFFLE_DOMAIN, data_step, salt)
            return [int(i) for i in drawn[: self.global_batch_size]]
        first = (data_step - 1) * self.global_batch_size
        return [self._at(position) for position in range(first, first + self.global_batch_size)]

    def local_indices(self, step: int) -> list[int]:
        """This rank's contiguous share of :meth:`global_indices` (sizes differ by at most one
        across ranks: weigh each rank's loss by its sample or token count)."""
        share = self._split(1).rank_slice(self.rank)
        indices = self.global_indices(step)[share.start : share.stop]
        self._drew(step, indices)
        return indices

    def local_micro_batches(self, step: int, *, micro_batch_size: int) -> list[list[int]]:
        """:meth:`local_indices` as micro-batches of at most ``micro_batch_size``, the same
        number on every rank (what FSDP needs); an empty list is a padding micro-batch, whose
        forward and backward the loop still runs with zero weight."""
        indices = self.global_indices(step)
        slices = self._split(micro_batch_size).micro_slices(self.rank)
        micro = [indices[part.start : part.stop] for part in slices]
        self._drew(step, [i for part in micro for i in part])
        return micro

    def describe(self) -> dict[str, Any]:
        """What rebuilds :meth:`global_indices` with a data ledger (JSON; no rank, no world
        size: the global batch depends on neither)."""
        return {
            "kind": KIND,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
        }

    @classmethod
    def from_description(cls, described: dict[str, Any], *, ledger: DataLedger) -> ElasticSampler:
        """The sampler :meth:`describe` describes, reading ``ledger`` (rank 0 of 1)."""
        if described.get("kind") != KIND:
            raise ValueError(f"sampler kind {described.get('kind')!r}: not {KIND!r}")
        return cls(
            int(described["num_samples"]),
            global_batch_size=int(described["global_batch_size"]),
            seed=int(described["seed"]),
            ledger=lambda: ledger,
        )

    def _drew(self, step: int, indices: list[int]) -> None:
        if self._on_draw is not None:
            self._on_draw(step, indices)

    def _split(self, micro_batch_size: int) -> BatchSplit:
        return BatchSplit(self.global_batch_size, self.world_size, micro_batch_size)

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._permutation(EPOCH_DOMAIN, epoch))
        return int(self._epoch[1][offset])

    def _permutation(self, *key: int) -> np.ndarray:
        seeds = np.random.SeedSequence([self.seed, *key])
        return np.random.Generator(np.random.Philox(seeds)).permutation(self.num_samples)
