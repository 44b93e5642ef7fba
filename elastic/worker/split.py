"""How one step's global batch splits over the data-parallel ranks and into micro-batches.

The global batch is fixed (it does not depend on the world size); the split is a pure function
of ``(num_samples, world_size, micro_batch_size)``, the same on every rank and after any resize:

- Rank ``r`` of ``W`` takes a contiguous slice of ``S // W`` or ``S // W + 1`` samples; the
  first ``S % W`` ranks take one more. Concatenated in rank order, the slices are the global
  batch.
- Every rank runs the same number of micro-batches, ``ceil(ceil(S / W) / micro_batch_size)``:
  FSDP all-gathers the parameters in each forward, so a rank that ran fewer forwards would
  leave the others waiting. A rank divides its slice over that many micro-batches by the same
  rule (sizes differ by at most one, at most ``micro_batch_size``). Where a slice holds fewer
  samples than there are micro-batches (``micro_batch_size=1``), the last ones are empty: the
  loop runs a padding micro-batch that contributes exactly nothing to the loss and gradient.

With uneven slices the per-rank means differ in weight: the loop normalises each rank's loss
sum by the global token count (a constant of the step), so the update is the gradient of the
global mean loss at every world size, up to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` holders: ``total // parts``, the first ``total % parts``
    holders one more."""
    if total < 0 or parts < 1:
        raise ValueError(f"total={total}, parts={parts}: need total >= 0 and parts >= 1")
    base, extra = divmod(total, parts)
    return [base + 1 if index < extra else base for index in range(parts)]


@dataclass(frozen=True)
class BatchSplit:
    """One step's split of ``num_samples`` over ``world_size`` ranks (positions in the global
    batch, as ``range``s)."""

    num_samples: int
    world_size: int
    micro_batch_size: int

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.world_size < 1 or self.micro_batch_size < 1:
            raise ValueError(
                f"num_samples={self.num_samples}, world_size={self.world_size}, "
                f"micro_batch_size={self.micro_batch_size}: each must be >= 1"
            )

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per rank, the same on every rank."""
        largest = -(-self.num_samples // self.world_size)
        return -(-largest // self.micro_batch_size)

    def rank_slice(self, rank: int) -> range:
        """Positions of ``rank``'s contiguous share of the global batch."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank}: need 0 <= rank < world_size ({self.world_size})")
        base, extra = divmod(self.num_samples, self.world_size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (1 if rank < extra else 0))

    def micro_slices(self, rank: int) -> list[range]:
        """``rank``'s micro-batches as positions in the global batch; an empty range is a
        padding micro-batch."""
        mine = self.rank_slice(rank)
        out, start = [], mine.start
        for size in split_sizes(len(mine), self.num_micro_batches):
            out.append(range(start, start + size))
            start += size
        return out


def unworkable_world_sizes(num_samples: int, world_sizes: Sequence[int]) -> list[int]:
    """World sizes at which some rank would get no sample of a ``num_samples`` batch."""
    return [w for w in world_sizes if w > num_samples]
