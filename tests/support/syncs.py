"""Counting device-to-host transfers (host syncs) of a stretch of code, for tests and benchmarks.

Every way a tensor's value reaches Python goes through a ``Tensor`` method that honours
``__torch_function__`` (``item``, ``tolist``, ``float(t)``, ``int(t)``, ``bool(t)``, ``cpu``,
``numpy``, ``.to("cpu")``), so a :class:`~torch.overrides.TorchFunctionMode` sees each one.
On a CUDA device each is a synchronisation of the host with the device's stream; on the CPU
the same calls are counted, so a CPU test pins the count a GPU run would pay.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ALWAYS = frozenset({"item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"})


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as syncs: ...`` then ``syncs.total`` and ``syncs.calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in _ALWAYS or (name == "to" and _to_host(args, kwargs)):
            self.calls[name] += 1
        return func(*args, **kwargs)


def _to_host(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """``tensor.to(...)`` that moves a tensor off its device to the CPU."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        return False
    targets = [*args[1:], kwargs.get("device")]
    return any(_is_cpu(target) for target in targets)


def _is_cpu(target: Any) -> bool:
    if isinstance(target, torch.device):
        return target.type == "cpu"
    if isinstance(target, str):
        return torch.device(target).type == "cpu"
    return False
