"""Rank agreement for the checkpoint manager: rank 0 decides, every rank learns the outcome.

Every collective call of the manager follows one pattern: rank 0 computes a small picklable
result (a manifest, a step, ``None``) or fails, and the result *or the failure* is broadcast, so
all ranks return the same thing or raise the same error type. A rank 0 failure therefore never
leaves the other ranks waiting in a collective that will not come.

Without an initialised ``torch.distributed`` (single process) the same calls run locally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from elastic.checkpoint.errors import CheckpointError

__all__ = ["RankGroup"]

T = TypeVar("T")


class RankGroup:
    """The ranks taking part in checkpointing, over ``process_group`` (default: the world)."""

    def __init__(self, *, rank: int, world_size: int, process_group: Any = None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}, world_size={world_size!r}: need 0 <= rank < size")
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self.distributed = dist.is_available() and dist.is_initialized()
        if world_size > 1 and not self.distributed:
            raise ValueError(f"world_size={world_size}: needs an initialised torch.distributed")
        if self.distributed:
            actual = dist.get_world_size(process_group)
            if actual != world_size:
                raise ValueError(f"world_size={world_size}: the process group has {actual} ranks")
            actual = dist.get_rank(process_group)
            if actual != rank:
                raise ValueError(f"rank={rank}: this process is rank {actual} of the group")
        self._side_group: Any = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def decide(self, fn: Callable[[], T], *, group: Any = None) -> T:
        """Run ``fn`` on rank 0 and return its result (or raise its error) on every rank."""
        if not self.distributed:
            return fn()
        payload: list[Any] = [None]
        local_exc: BaseException | None = None
        if self.is_leader:
            try:
                payload[0] = ("ok", fn())
            except Exception as exc:
                # Broadcast first, re-raise after: the other ranks are already waiting for us.
                local_exc = exc
                shared = exc if isinstance(exc, CheckpointError) else None
                payload[0] = ("error", shared, f"rank 0 failed: {type(exc).__name__}: {exc}")
        group = self.process_group if group is None else group
        dist.broadcast_object_list(payload, src=self._leader_global_rank(group), group=group)
        if local_exc is not None:
            raise local_exc
        kind, *rest = payload[0]
        if kind == "ok":
            return rest[0]  # type: ignore[no-any-return]
        shared_exc, message = rest
        raise shared_exc if shared_exc is not None else CheckpointError(message)

    def gather(self, value: T, *, group: Any = None) -> list[T]:
        """Every rank's ``value``, by rank, on every rank (small picklable values only)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.process_group if group is None else group)
        return out

    def any_rank(self, flag: bool, *, group: Any = None) -> bool:
        """True on every rank when ``flag`` is true on at least one (a CPU all-reduce)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(
            value, op=dist.ReduceOp.MAX, group=self.process_group if group is None else group
        )
        return bool(value.item())

    def side_group(self) -> Any:
        """A dedicated gloo group for background saves (created once, collectively).

        Async saves run collectives from a background thread while training runs its own on
        the main group; sharing one group would interleave the two streams differently on
        different ranks.
        """
        if not self.distributed:
            return None
        if self._side_group is None:
            ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
            self._side_group = dist.new_group(ranks=ranks, backend="gloo")
        return self._side_group

    def close(self) -> None:
        if self._side_group is not None and self.distributed and dist.is_initialized():
            dist.destroy_process_group(self._side_group)
        self._side_group = None

    def _leader_global_rank(self, group: Any) -> int:
        return 0 if group is None else dist.get_global_rank(group, 0)
