"""TrackedState: a loop's objects to one DCP state and back, through a real checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from elastic.checkpoint import CheckpointConfig, CheckpointManager
from elastic.worker.state import TrackedState


class Counter:
    """A loop's own Stateful: anything with state_dict() / load_state_dict()."""

    def __init__(self, samples_seen: int = 0) -> None:
        self.samples_seen = samples_seen

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples_seen = int(state["samples_seen"])


def workload(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    return {"model": model, "optim": optim, "sched": sched, "counter": Counter()}


def train(objects: dict[str, Any], steps: int) -> None:
    model, optim, sched = objects["model"], objects["optim"], objects["sched"]
    for _ in range(steps):
        model(torch.randn(3, 4)).square().mean().backward()
        optim.step()
        optim.zero_grad()
        sched.step()
        objects["counter"].samples_seen += 3


def tracked(objects: dict[str, Any]) -> TrackedState:
    state = TrackedState()
    for name, obj in objects.items():
        state.add(name, obj)
    return state


def manager(tmp_path: Path) -> CheckpointManager:
    config = CheckpointConfig(url=str(tmp_path))
    return CheckpointManager(config, run_id="state", rank=0, world_size=1)


def test_tracked_objects_round_trip_through_a_checkpoint(tmp_path: Path, gloo: None) -> None:
    saved = workload(seed=0)
    train(saved, steps=3)
    ckpt = manager(tmp_path)
    ckpt.save(3, tracked(saved).build(), meta={})
    ckpt.wait()

    restored = workload(seed=1)  # other weights, fresh optimizer and schedule
    into = tracked(restored)
    state = into.build()
    manifest = manager(tmp_path).load(state, step=None)
    assert manifest is not None and manifest.step == 3
    into.restore(state)

    for got, want in zip(restored["model"].parameters(), saved["model"].parameters(), strict=True):
        assert torch.equal(got, want)
    got_optim = restored["optim"].state_dict()
    want_optim = saved["optim"].state_dict()
    for index, slots in want_optim["state"].items():
        for key, value in slots.items():
            assert torch.equal(got_optim["state"][index][key], value), key
    assert restored["sched"].state_dict() == saved["sched"].state_dict()
    assert restored["optim"].param_groups[0]["lr"] == saved["optim"].param_groups[0]["lr"]
    assert restored["counter"].samples_seen == 9


def test_restored_training_continues_exactly(tmp_path: Path, gloo: None) -> None:
    reference = workload(seed=0)
    train(reference, steps=2)
    ckpt = manager(tmp_path)
    ckpt.save(2, tracked(reference).build(), meta={})
    ckpt.wait()
    resumed = workload(seed=5)
    into = tracked(resumed)
    state = into.build()
    manager(tmp_path).load(state, step=2)
    into.restore(state)
    torch.manual_seed(9)
    train(reference, steps=2)
    torch.manual_seed(9)
    train(resumed, steps=2)
    for got, want in zip(
        resumed["model"].parameters(), reference["model"].parameters(), strict=True
    ):
        assert torch.equal(got, want)


def test_building_a_fresh_optimizer_state_gives_it_slots() -> None:
    objects = workload(seed=0)
    state = tracked({"model": objects["model"], "optim": objects["optim"]}).build()
    assert state["optim"]["state"], "a fresh optimizer's state must have slots to load into"


def test_two_modules_with_an_optimizer_are_refused() -> None:
    objects = workload(seed=0)
    state = TrackedState()
    state.add("model", objects["model"])
    state.add("head", torch.nn.Linear(2, 2))  # two modules and no optimizer: fine
    with pytest.raises(ValueError, match="2 modules"):
        state.add("optim", objects["optim"])
    assert state.names == ["model", "head"]  # the refused object is not tracked
    assert set(state.build()) == {"model", "head"}


def test_an_object_without_state_dict_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"track\(step=int\)"):
        TrackedState().add("step", 3)


def test_a_name_that_is_not_an_identifier_is_refused() -> None:
    with pytest.raises(ValueError, match="identifier"):
        TrackedState().add("my model", torch.nn.Linear(1, 1))


def test_names_keep_their_order() -> None:
    objects = workload(seed=0)
    assert tracked(objects).names == ["model", "optim", "sched", "counter"]
