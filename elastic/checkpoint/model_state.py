"""Model + optimizer state for checkpoints, for FSDP2-sharded and plain modules alike.

Wraps ``torch.distributed.checkpoint.state_dict``: the state it returns holds DTensors for
sharded parameters (DCP writes each rank's shards and reshards on load at any world size) and
plain tensors otherwise. Optimizer state is keyed by parameter name, not by position, so it
survives resharding too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["app_state", "restore_app_state"]


def app_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` ready for ``CheckpointManager.save`` / ``load``.

    For a load, build it from the freshly constructed model and optimizer: DCP loads in place
    into these tensors, then :func:`restore_app_state` pushes them back into the objects.
    """
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        # Initialises empty optimizer state (a zero-grad step) so a fresh optimizer has slots.
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def restore_app_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]
) -> None:
    """Copy loaded ``state`` (from :func:`app_state` + ``load``) into the model and optimizer."""
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        if "optim" not in state:
            raise KeyError("state has no 'optim' entry; build it with app_state(model, opt)")
        set_optimizer_state_dict(model, optimizer, state["optim"])
