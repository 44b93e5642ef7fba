"""The per-step vote: what every rank leaves with, and its one host sync."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import pytest
import torch
import torch.distributed as dist

from elastic.worker import vote as vote_module
from elastic.worker.ledger import StepDigest, sample_sums
from elastic.worker.vote import AgreedStep, StepVote
from tests.support.syncs import HostSyncCounter

CPU = torch.device("cpu")


def cast(**kwargs: Any) -> StepVote:
    """One rank's vote; defaults: no tokens, no grad norm, no requests, not rank 0."""
    defaults: dict[str, Any] = {
        "tokens": None,
        "grad_norm": None,
        "drain": False,
        "pause": False,
        "rewind_to": None,
        "is_main": False,
    }
    return StepVote.of(**(defaults | kwargs))


class PeerWorld:
    """Stands in for ``torch.distributed`` in a world of two: the all-reduce adds ``peer``'s
    packed vote, as gloo would with a second rank that cast it."""

    ReduceOp = dist.ReduceOp

    def __init__(self, peer: StepVote) -> None:
        self._peer = [float(v) for v in peer.values()]
        self.reduces = 0

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> None:
        assert op == dist.ReduceOp.SUM
        self.reduces += 1
        tensor += torch.tensor(self._peer, dtype=tensor.dtype)


def agree_with(monkeypatch: pytest.MonkeyPatch, mine: StepVote, peer: StepVote) -> AgreedStep:
    world = PeerWorld(peer)
    monkeypatch.setattr(vote_module, "dist", world)
    agreed = mine.agree(CPU)
    assert world.reduces == 1
    return agreed


def test_float_losses_agree_on_the_token_weighted_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = cast(loss=2.0, tokens=100, grad_norm=0.5, is_main=True)
    peer = cast(loss=4.0, tokens=300, grad_norm=0.9)
    agreed = agree_with(monkeypatch, mine, peer)
    assert agreed.loss == pytest.approx((2.0 * 100 + 4.0 * 300) / 400)
    assert agreed.tokens == 400
    assert agreed.finite


def test_tensor_losses_agree_on_the_token_weighted_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = cast(
        loss=torch.tensor(2.0, requires_grad=True),
        tokens=torch.tensor(100),
        grad_norm=torch.tensor(0.5),
        is_main=True,
    )
    peer = cast(loss=torch.tensor([4.0]), tokens=torch.tensor(300))
    agreed = agree_with(monkeypatch, mine, peer)
    assert agreed.loss == pytest.approx(3.5)
    assert agreed.grad_norm == pytest.approx(0.5)


def test_without_tokens_every_rank_weighs_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    agreed = agree_with(monkeypatch, cast(loss=1.0, is_main=True), cast(loss=torch.tensor(2.0)))
    assert agreed.loss == pytest.approx(1.5)
    assert agreed.tokens == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), torch.tensor(float("nan"))])
def test_a_nonfinite_loss_on_any_rank_makes_the_step_nonfinite(
    monkeypatch: pytest.MonkeyPatch, bad: float | torch.Tensor
) -> None:
    agreed = agree_with(monkeypatch, cast(loss=1.0, is_main=True), cast(loss=bad))
    assert not agreed.finite


def test_a_nonfinite_grad_norm_on_rank_0_makes_the_step_nonfinite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mine = cast(loss=1.0, grad_norm=torch.tensor(float("inf")), is_main=True)
    assert not agree_with(monkeypatch, mine, cast(loss=1.0)).finite


def test_only_rank_0_grad_norm_and_rewind_request_count(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = cast(loss=1.0, grad_norm=0.25, rewind_to=40, is_main=True)
    peer = cast(loss=1.0, grad_norm=float("nan"), rewind_to=80)
    agreed = agree_with(monkeypatch, mine, peer)
    assert agreed.grad_norm == 0.25
    assert agreed.rewind_to == 40
    assert agreed.finite


def test_a_rewind_to_step_0_is_a_request_and_none_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        agree_with(monkeypatch, cast(loss=1.0, rewind_to=0, is_main=True), cast(loss=1.0)).rewind_to
        == 0
    )
    assert agree_with(monkeypatch, cast(loss=1.0, is_main=True), cast(loss=1.0)).rewind_to is None


@pytest.mark.parametrize(("drain", "pause"), [(True, False), (False, True), (True, True)])
def test_a_request_seen_by_any_rank_is_agreed(
    monkeypatch: pytest.MonkeyPatch, drain: bool, pause: bool
) -> None:
    peer = cast(loss=1.0, drain=drain, pause=pause)
    agreed = agree_with(monkeypatch, cast(loss=1.0, is_main=True), peer)
    assert (agreed.drain, agreed.pause) == (drain, pause)


def test_no_requests_agree_on_none(monkeypatch: pytest.MonkeyPatch) -> None:
    agreed = agree_with(monkeypatch, cast(loss=1.0, is_main=True), cast(loss=1.0))
    assert (agreed.drain, agreed.pause, agreed.rewind_to) == (False, False, None)


def test_a_one_process_group_agrees_with_itself(gloo: None) -> None:
    agreed = cast(
        loss=torch.tensor(3.0), tokens=8, grad_norm=torch.tensor(0.1), is_main=True
    ).agree(CPU)
    assert agreed.loss == pytest.approx(3.0)
    assert agreed.grad_norm == pytest.approx(0.1)
    assert agreed.tokens == 8


def test_zero_total_weight_agrees_on_a_nan_loss() -> None:
    sums = {f.name: 0.0 for f in fields(StepVote)} | {"loss_sum": 1.0}
    agreed = AgreedStep.from_sums(sums)
    assert math.isnan(agreed.loss)
    assert not agreed.finite


def test_agree_with_tensor_loss_and_grad_norm_makes_exactly_one_host_sync(gloo: None) -> None:
    loss = torch.tensor(2.5, requires_grad=True) * 2
    vote = cast(loss=loss, tokens=64, grad_norm=torch.tensor(0.7), is_main=True)
    with HostSyncCounter() as syncs:
        vote.agree(CPU)
    assert syncs.total == 1
    assert syncs.calls == {"tolist": 1}


def test_casting_a_tensor_vote_makes_no_host_sync() -> None:
    with HostSyncCounter() as syncs:
        cast(loss=torch.tensor(1.0), tokens=torch.tensor(3), grad_norm=torch.tensor(2.0))
    assert syncs.total == 0


def test_the_sync_counter_sees_every_way_a_value_reaches_python() -> None:
    value = torch.tensor([1.5, 2.5])
    with HostSyncCounter() as syncs:
        value[0].item()
        value[1].item()
        value.tolist()
        float(value[0]), int(value[0]), bool(value[0])
        value.cpu(), value.numpy()
        torch.stack([value, value]).sum()  # no transfer
    assert syncs.calls == {
        "item": 2,
        "tolist": 1,
        "__float__": 1,
        "__int__": 1,
        "__bool__": 1,
        "cpu": 1,
        "numpy": 1,
    }


@pytest.mark.parametrize(
    "move",
    [
        lambda t: t.to("cpu"),
        lambda t: t.to(torch.device("cpu")),
        lambda t: t.to(device="cpu", dtype=torch.float64),
    ],
)
def test_the_sync_counter_counts_a_move_to_the_host_from_another_device(move: Any) -> None:
    off_host = torch.empty(2, device="meta")  # stands in for a GPU tensor
    with HostSyncCounter() as syncs:
        with pytest.raises(NotImplementedError):  # a meta tensor has no data to copy
            move(off_host)
        move(torch.ones(2))  # already on the host: no transfer
        torch.ones(2).to(torch.float64)
    assert syncs.calls == {"to": 1}


def test_two_ranks_draws_agree_on_the_digest_of_the_whole_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mine = cast(loss=1.0, is_main=True, drawn=sample_sums(5, [10, 11, 12]))
    peer = cast(loss=torch.tensor(1.0), drawn=sample_sums(5, [13, 14]))
    agreed = agree_with(monkeypatch, mine, peer)
    assert agreed.drawn == StepDigest.of(5, [14, 12, 10, 13, 11])
    assert agreed.drawn.count == 5


def test_a_vote_without_draws_agrees_on_an_empty_step() -> None:
    sums = {f.name: 0.0 for f in fields(StepVote)} | {"loss_sum": 1.0, "weight": 1.0}
    assert AgreedStep.from_sums(sums).drawn == StepDigest.of(1, [])
