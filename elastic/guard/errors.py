"""Errors of the guard package: one root, a subclass per way a caller can misuse it.

Divergence itself is never an exception here: it is a verdict (``give_up``) the trainer acts on.
These errors are programming or persistence mistakes and are permanent (retrying won't help).
"""

from __future__ import annotations


class GuardError(Exception):
    """Root of the guard package's errors."""


class GuardStateError(GuardError):
    """A call out of order, e.g. ``observe()`` while a rewind waits for ``record_rewind()``."""


class GuardStateInvalid(GuardError, ValueError):
    """A persisted ``state_dict`` that cannot be restored (wrong version, missing or bad fields)."""
