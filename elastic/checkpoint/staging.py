"""Staging for async saves: a CPU copy of the state, into buffers reused from save to save.

``dcp.async_save`` first *stages* the state (copies every tensor to CPU memory the trainer will
not touch), then writes the copy in the background. Left to itself it allocates a fresh copy on
every save; for a large state most of that time is the kernel faulting in new pages, not the
copy. :class:`ReusingStager` keeps the staged buffers alive between saves (torch's
``StateDictStager`` cache, keyed by the source tensor's storage), so from the second save on
staging is one memcpy into memory that is already mapped.

Costs and caveats:

- Memory: one CPU copy of this rank's state stays allocated while the manager lives (it is the
  same copy every async save needed anyway, now kept instead of re-made). ``close()`` frees it.
- Buffers are reused, so a save may only start staging once the previous save's write has
  finished; the manager guarantees that (every ``save`` first completes the pending one).
- ``background=True`` copies in a worker thread and returns at once. The caller must not change
  the staged tensors until :meth:`ReusingStager.wait` returns. A caller that breaks this is
  caught where it can be: every source tensor's in-place version counter is recorded when
  staging starts and compared when the copy ends (``changed`` names the tensors), and the manager
  then refuses to commit that checkpoint. This check is a safety net, not the guarantee: writes
  through ``.data`` and, in torch 2.13, ``foreach`` in-place ops on DTensors (the default
  path of torch optimizers on GPU for FSDP2 parameters) move no version counter and go unseen.
  The guarantee is the caller calling ``wait()`` (the manager's ``wait_staged()``) first.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import torch
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

__all__ = ["ReusingStager", "source_versions"]


class ReusingStager(AsyncStager):
    """A torch ``AsyncStager`` that copies into cached CPU buffers, inline or in a thread."""

    # dcp.async_save must not call the deprecated synchronize_staging(); the manager waits.
    _synchronize_after_execute = False

    def __init__(self) -> None:
        # Pinned buffers make device-to-host copies fast; on a CPU-only build torch would warn.
        # torch's StateDictStager itself, not the public DefaultStager around it: in torch 2.11
        # DefaultStager closes it after every stage, and the next stage fails with
        # "KeyError: <class 'type'>" (pytorch#183413). Threading is ours, so no async options.
        self._stager = StateDictStager(pin_memory=torch.cuda.is_available(), share_memory=False)
        self._pool: ThreadPoolExecutor | None = None
        self._staging: Future[Any] | None = None
        self.background = False
        """Stage the next ``stage()`` call in a worker thread instead of inline."""
        self.changed: list[str] = []
        """Tensors written in place while the last staging copy ran (empty: a clean copy)."""

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any] | Future[dict[str, Any]]:
        """Called by ``dcp.async_save`` in the caller's thread."""
        self.changed = []
        before = source_versions(state_dict)
        if not self.background:
            return self._copy(state_dict, before)
        self._staging = self._worker().submit(self._copy, state_dict, before)
        return self._staging

    def wait(self) -> None:
        """Return once the last staging copy has finished (re-raises its error, if any)."""
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.result()

    def synchronize_staging(self) -> None:
        """Torch's older name for :meth:`wait`."""
        self.wait()

    def close(self) -> None:
        """Wait for a copy in flight, stop the worker and free the cached buffers."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._stager.close()

    def _copy(self, state_dict: dict[str, Any], before: dict[str, int]) -> dict[str, Any]:
        # StateDictStager copies inline and returns the copied dict.
        staged = cast(dict[str, Any], self._stager.stage(state_dict, non_blocking=False))
        after = source_versions(state_dict)
        self.changed = sorted(k for k, v in before.items() if after.get(k) != v)
        return staged

    def _worker(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-stage")
        return self._pool


def source_versions(state_dict: dict[str, Any]) -> dict[str, int]:
    """In-place version counter of every tensor in ``state_dict``, by dotted path."""
    return dict(_versions(state_dict, ""))


def _versions(obj: Any, path: str) -> Iterator[tuple[str, int]]:
    if isinstance(obj, DTensor):
        # Depending on the op, an in-place update bumps the wrapper's counter or the local
        # shard's; foreach ops on DTensors bump neither (not detectable, see module docstring).
        yield path, obj._version + obj._local_tensor._version
    elif isinstance(obj, torch.Tensor):
        yield path, obj._version
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _versions(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            yield from _versions(value, f"{path}.{index}" if path else str(index))
