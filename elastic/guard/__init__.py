"""Divergence guard: pure detection of NaN, spikes and sustained loss elevation, and the policy
that turns them into skip / rewind / give-up verdicts and rewind plans.

Pure decision logic on plain numbers: no torch, no I/O, no clocks, no randomness, so every rank
computes the same verdict from the same all-reduced inputs. See docs/guard.md.
"""

from elastic.guard.config import (
    GuardConfig,
    RewindConfig,
    promotion_horizon_steps,
    rewind_lookback_steps,
)
from elastic.guard.errors import GuardError, GuardStateError, GuardStateInvalid
from elastic.guard.planning import promotable
from elastic.guard.policy import Guard
from elastic.guard.verdicts import (
    Action,
    CheckpointInfo,
    GiveUp,
    GuardState,
    Kind,
    RewindPlan,
    Verdict,
)

__all__ = [
    "Action",
    "CheckpointInfo",
    "GiveUp",
    "Guard",
    "GuardConfig",
    "GuardError",
    "GuardState",
    "GuardStateError",
    "GuardStateInvalid",
    "Kind",
    "RewindConfig",
    "RewindPlan",
    "Verdict",
    "promotable",
    "promotion_horizon_steps",
    "rewind_lookback_steps",
]
