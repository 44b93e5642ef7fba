"""The one per-step collective: every rank's loss, finiteness, grad norm, control requests and
drawn samples, reduced together so that all ranks leave with the identical inputs to the guard
and the identical digest of the step's global batch (the data chain's, :mod:`elastic.worker.
ledger`).

Packed by name (:class:`StepVote` -> one float64 tensor -> :class:`AgreedStep`), not by
position in the caller. Tensors stay on the device until the single ``tolist()`` at the end:
the API's step path makes one device-to-host transfer per step, whatever the loop passes. The
values that are always on the host (control flags, sample sums) travel to the device as one
tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from elastic.worker.ledger import NUM_LIMBS, StepDigest

Number = torch.Tensor | float | int
NO_SAMPLES = (0.0,) * (1 + NUM_LIMBS)  # sample count, then the limb sums
PACKED = (
    *("loss_sum", "weight", "nonfinite", "grad_norm", "drain", "pause", "rewind_plus_one"),
    *(f"drawn.{i}" for i in range(len(NO_SAMPLES))),
)
MAYBE_TENSORS = 4  # loss_sum .. grad_norm: a tensor or a number, per rank


@dataclass(frozen=True)
class StepVote:
    """What one rank brings to the vote. Rank 0's grad norm and rewind request count; others
    contribute 0 there (identical bits on every rank, whatever each computed)."""

    loss_sum: Number  # this rank's loss x its weight (token count, or 1)
    weight: Number  # this rank's token count (or 1)
    nonfinite: Number  # 1 when this rank's loss is NaN or infinite
    grad_norm: Number
    drain: float
    pause: float
    rewind_plus_one: float  # rank 0's rewind request as to_step + 1 (0: none)
    drawn: tuple[float, ...] = NO_SAMPLES  # this rank's sample_sums() of the step's sample ids

    @classmethod
    def of(
        cls,
        *,
        loss: Number,
        tokens: Number | None,
        grad_norm: Number | None,
        drain: bool,
        pause: bool,
        rewind_to: int | None,
        is_main: bool,
        drawn: tuple[float, ...] = NO_SAMPLES,
    ) -> StepVote:
        weight: Number = 1.0 if tokens is None else tokens
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().to(torch.float64).reshape(())
            nonfinite: Number = (~torch.isfinite(loss)).to(torch.float64)
        else:
            nonfinite = 0.0 if math.isfinite(float(loss)) else 1.0
        main_norm: Number = 0.0
        if is_main and grad_norm is not None:
            main_norm = grad_norm
        rewind = float(rewind_to + 1) if (is_main and rewind_to is not None) else 0.0
        return cls(
            loss * weight,
            weight,
            nonfinite,
            main_norm,
            float(drain),
            float(pause),
            rewind,
            drawn,
        )

    def values(self) -> list[Number]:
        """The packed values in :data:`PACKED` order, the same on every rank: the first
        :data:`MAYBE_TENSORS` may be tensors, the rest are host floats."""
        assert len(self.drawn) == len(NO_SAMPLES), self.drawn
        return [
            *(self.loss_sum, self.weight, self.nonfinite, self.grad_norm),
            *(self.drain, self.pause, self.rewind_plus_one, *self.drawn),
        ]

    def agree(self, device: torch.device) -> AgreedStep:
        """COLLECTIVE: all-reduce (sum) and read back once."""
        values = self.values()
        host = [float(v) for v in values[MAYBE_TENSORS:]]  # type: ignore[arg-type]
        packed = torch.cat(
            [
                torch.stack([_as_tensor(v, device) for v in values[:MAYBE_TENSORS]]),  # (4,)
                torch.tensor(host, dtype=torch.float64, device=device),  # (8,): one copy in
            ]
        )  # (12,) float64
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        return AgreedStep.from_sums(dict(zip(PACKED, packed.tolist(), strict=True)))


@dataclass(frozen=True)
class AgreedStep:
    """The reduced vote, identical on every rank."""

    loss: float  # weighted mean over ranks
    tokens: float  # total weight (tokens of the step when the loop passes them)
    finite: bool
    grad_norm: float
    drain: bool
    pause: bool
    rewind_to: int | None
    drawn: StepDigest  # the step's samples as every rank drew them, together

    @classmethod
    def from_sums(cls, sums: dict[str, float]) -> AgreedStep:
        weight = sums["weight"]
        loss = sums["loss_sum"] / weight if weight else float("nan")
        grad_norm = sums["grad_norm"]
        finite = sums["nonfinite"] == 0 and math.isfinite(loss) and math.isfinite(grad_norm)
        rewind = int(sums["rewind_plus_one"]) - 1 if sums["rewind_plus_one"] > 0 else None
        return cls(
            loss=loss,
            tokens=weight,
            finite=finite,
            grad_norm=grad_norm,
            drain=sums["drain"] > 0,
            pause=sums["pause"] > 0,
            rewind_to=rewind,
            drawn=StepDigest.from_sums(
                [sums.get(f"drawn.{i}", 0.0) for i in range(len(NO_SAMPLES))]
            ),
        )


def _as_tensor(value: Number, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)
