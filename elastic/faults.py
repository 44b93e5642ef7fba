"""Fault injection for tests and drills: which fault fires where, and "at most once per run".

Config (`faults:` list, refused unless ``ELASTICD_ALLOW_FAULTS=1`` — the check is made where the
config is resolved, in ``main()``):

    faults:
      - {kind: kill, step: 20, rank: 1}        # SIGKILL the worker of global rank 1 before step 20
      - {kind: hang, step: 30}                 # stop making progress (no heartbeat) at step 30
      - {kind: crash_on_start, times: 0}       # exit non-zero at start-up; times 0 = on every try
      - {kind: nan, step: 150}                 # the loss of step 150 becomes NaN
      - {kind: poison_batch, step: 40, mode: repeat}   # tokens replaced (random | repeat)
      - {kind: lr_spike, step: 300, factor: 50, duration_steps: 20}
      - {kind: slow, step: 50, rank: 2, ms: 300, steps: 100}   # a straggler: +300 ms per step

Each fault fires at most ``times`` times per run (default once) across restarts, rewinds and
reshards: before firing, the firing rank records the firing under the checkpoint storage root
(``<checkpoint.url>/<run_id>/faults/``), which every node shares. Faults whose ``rank`` is
omitted fire on global rank 0 (``kill``, ``hang``, ``poison_batch``, ``nan``, ``slow``) or on
every rank (``lr_spike``, ``crash_on_start``) — the kinds that must be identical on all ranks.

``slow`` stands in for a straggler (a throttled GPU, a slow host): from ``step`` on, for
``steps`` steps (0: to the end of training), the rank sleeps ``ms`` milliseconds inside each
step, before the step's collective, so the time counts as the rank's step compute time. Like
``lr_spike``, the window lives in the worker process: a restart of the workers ends it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from elastic.config import ConfigError, check

ALLOW_FAULTS_ENV = "ELASTICD_ALLOW_FAULTS"

FaultKind = Literal["kill", "hang", "crash_on_start", "nan", "poison_batch", "lr_spike", "slow"]
EVERY_RANK_KINDS = frozenset({"lr_spike", "crash_on_start"})


@dataclass(frozen=True)
class FaultConfig:
    """One injected fault."""

    kind: FaultKind
    step: int = 0  # global step before which it fires (crash_on_start ignores it)
    rank: int | None = None  # global rank that fires it (see the module docstring)
    times: int = 1  # how many firings per run; 0 means every time it is reached
    factor: float = 100.0  # lr_spike: learning-rate multiplier
    duration_steps: int = 10  # lr_spike: how many steps the multiplier lasts
    mode: Literal["random", "repeat"] = "random"  # poison_batch: token replacement
    ms: int = 0  # slow: milliseconds of extra compute per step (required, > 0)
    steps: int = 0  # slow: how many steps it lasts; 0 = to the end of training

    def __post_init__(self) -> None:
        check(self.step >= 0, "step", self.step, "must be >= 0")
        check(self.rank is None or self.rank >= 0, "rank", self.rank, "must be >= 0")
        check(self.times >= 0, "times", self.times, "must be >= 0 (0 = every time)")
        check(self.factor > 0, "factor", self.factor, "must be > 0")
        check(self.duration_steps > 0, "duration_steps", self.duration_steps, "must be > 0")
        check(self.ms >= 0, "ms", self.ms, "must be >= 0")
        check(self.kind != "slow" or self.ms > 0, "ms", self.ms, "must be > 0 for kind slow")
        check(self.steps >= 0, "steps", self.steps, "must be >= 0 (0 = to the end)")

    def fires_on(self, rank: int) -> bool:
        if self.rank is not None:
            return self.rank == rank
        return self.kind in EVERY_RANK_KINDS or rank == 0


def require_permission(faults: Sequence[FaultConfig], environ: Mapping[str, str]) -> None:
    """Fault injection is for tests and drills: refused unless ELASTICD_ALLOW_FAULTS=1."""
    if faults and environ.get(ALLOW_FAULTS_ENV) != "1":
        raise ConfigError(
            f"faults={len(faults)} entries: fault injection is refused unless {ALLOW_FAULTS_ENV}=1"
        )


class FiringRecord(Protocol):
    """Where firings are remembered (shared storage in production, a dict in unit tests)."""

    def exists(self, rel: str) -> bool: ...

    def read_bytes(self, rel: str) -> bytes: ...

    def write_bytes(self, rel: str, data: bytes) -> None: ...


class FaultInjector:
    """Answers "does fault X fire now on this rank?" and records each firing durably first."""

    def __init__(
        self, faults: Sequence[FaultConfig], *, rank: int, record: FiringRecord | None
    ) -> None:
        self._faults = tuple(faults)
        self._rank = rank
        self._record = record
        # Read every count now, before the first collective: ranks that fire the same fault
        # must all see the count as it was before any of them fired it.
        self._fired: dict[int, int] = {i: self._stored_count(i) for i in range(len(self._faults))}

    def due(self, kind: str, step: int | None = None) -> FaultConfig | None:
        """The first fault of ``kind`` due at ``step`` on this rank, recorded as fired."""
        for index, fault in enumerate(self._faults):
            if fault.kind != kind or not fault.fires_on(self._rank):
                continue
            if step is not None and fault.step != step:
                continue
            if self._take(index, fault):
                return fault
        return None

    def _take(self, index: int, fault: FaultConfig) -> bool:
        count = self._count(index)
        if fault.times and count >= fault.times:
            return False
        self._fired[index] = count + 1
        if self._record is not None:
            # Durable before the fault acts: a kill must not fire again after the restart.
            self._record.write_bytes(_rel(index), json.dumps({"count": count + 1}).encode())
        return True

    def _count(self, index: int) -> int:
        return self._fired[index]

    def _stored_count(self, index: int) -> int:
        if self._record is None or not self._record.exists(_rel(index)):
            return 0
        return int(json.loads(self._record.read_bytes(_rel(index)))["count"])


def _rel(index: int) -> str:
    return f"faults/fault-{index}.json"
