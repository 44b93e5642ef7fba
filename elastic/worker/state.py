"""The objects a loop asks elasticd to checkpoint, as one DCP state and back.

Anything with ``state_dict()`` / ``load_state_dict()`` can be tracked (torchtitan's and DCP's
``Stateful``). Modules and optimizers go through ``torch.distributed.checkpoint.state_dict``,
so FSDP2-sharded parameters are saved as DTensors and resharded on load at any world size, and
optimizer state is keyed by parameter name, not position. Other objects (LR schedulers, a
loop's own counters) are saved as their ``state_dict()``. Optimizers need the module whose
parameters they hold: track exactly one module when any optimizer is tracked.
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


class TrackedState:
    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}

    def add(self, name: str, obj: Any) -> None:
        if not name.isidentifier():
            raise ValueError(f"track({name}=...): the name must be a Python identifier")
        if not (
            callable(getattr(obj, "state_dict", None))
            and callable(getattr(obj, "load_state_dict", None))
        ):
            raise ValueError(
                f"track({name}={type(obj).__name__}): needs state_dict() and load_state_dict()"
            )
        objects = {**self._objects, name: obj}
        _single_module(objects)  # fail now, not at the first save, and leave nothing tracked
        self._objects = objects

    @property
    def names(self) -> list[str]:
        return list(self._objects)

    def build(self) -> dict[str, Any]:
        """The state to save, or to load into in place (build it from the live objects)."""
        module = self._module()
        state: dict[str, Any] = {}
        for name, obj in self._objects.items():
            if isinstance(obj, torch.nn.Module):
                state[name] = get_model_state_dict(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                assert module is not None
                # Initialises empty optimizer state (a zero-grad step): a fresh one has slots.
                state[name] = get_optimizer_state_dict(module, obj)
            else:
                state[name] = obj.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Push a loaded ``state`` (from :meth:`build` + a checkpoint load) into the objects."""
        module = self._module()
        for name, obj in self._objects.items():
            if isinstance(obj, torch.nn.Module):
                set_model_state_dict(obj, state[name])
            elif isinstance(obj, torch.optim.Optimizer):
                assert module is not None
                set_optimizer_state_dict(module, obj, state[name])
            else:
                obj.load_state_dict(state[name])

    def _module(self) -> torch.nn.Module | None:
        return _single_module(self._objects)


def _single_module(objects: dict[str, Any]) -> torch.nn.Module | None:
    """The one module optimizers are keyed against (None: no module tracked)."""
    modules = [o for o in objects.values() if isinstance(o, torch.nn.Module)]
    has_optimizer = any(isinstance(o, torch.optim.Optimizer) for o in objects.values())
    if has_optimizer and len(modules) != 1:
        raise ValueError(
            f"track(): {len(modules)} modules tracked with an optimizer; track exactly one "
            "module (wrap several in one nn.Module) so optimizer state is keyed by name"
        )
    return modules[0] if modules else None
