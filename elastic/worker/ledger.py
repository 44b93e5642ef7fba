"""The run ledger: data decisions and divergence events of a run, and the data ledger's rules.

The data ledger (:class:`DataLedger`) maps a training step to its ``(data step, salt)``; it holds
the data decisions taken when a run rewinds after a divergence, in the order they were taken:

- ``reshuffle [a, b)``: training steps ``a..b-1`` draw fresh, deterministic samples (a new salt).
- ``skip [a, b)``: the data of training steps ``a..b-1`` is never used; training step ``s >= a``
  uses the data that step ``s + (b - a)`` used before the entry. Entries compose in order, so
  several skips add up (one skip alone: data step ``= s + (b - a)``).

The windows are in the training-step numbering of the moment the entry was made. Resolving step
``s`` walks the entries newest first: each skip with ``a <= t`` moves ``t`` forward by ``b - a``,
and the newest reshuffle whose window holds ``t`` gives the salt (0 when none does).

The run ledger (:class:`RunLedger`) travels in every checkpoint manifest (``meta.ledger``) and,
at each rewind, is also written to ``<checkpoint.url>/<run_id>/ledger.json``: a rewind changes
the data of steps after a checkpoint that already exists, so a worker killed during the replay
must find the decision somewhere newer than that checkpoint. Entries are only ever added, so two
ledgers merge by union. Samplers (the worker API's :class:`~elastic.worker.sampler.
ElasticSampler`, the bundled trainer's mixture) read the data ledger; nothing here imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

SALT_BITS = 11
LedgerKind = Literal["skip", "reshuffle"]


@dataclass(frozen=True)
class LedgerEntry:
    kind: LedgerKind
    start_step: int
    end_step: int  # exclusive
    salt: int

    def __post_init__(self) -> None:
        if self.kind not in ("skip", "reshuffle"):
            raise ValueError(f"kind={self.kind!r}: must be skip or reshuffle")
        if not 0 <= self.start_step < self.end_step:
            raise ValueError(f"[{self.start_step}, {self.end_step}): need 0 <= start < end")
        if not 0 < self.salt < 2**SALT_BITS:
            raise ValueError(f"salt={self.salt}: must be in [1, {2**SALT_BITS})")


@dataclass(frozen=True)
class DataLedger:
    """Skip and reshuffle decisions, in the order they were taken (immutable)."""

    entries: tuple[LedgerEntry, ...] = ()

    def with_entry(
        self, kind: LedgerKind, start_step: int, end_step: int, *, salt: int | None = None
    ) -> DataLedger:
        """A new ledger with one more entry; the default salt is fresh (1 + number of entries)."""
        entry = LedgerEntry(kind, start_step, end_step, salt or 1 + len(self.entries))
        return DataLedger((*self.entries, entry))

    def resolve(self, step: int) -> tuple[int, int]:
        """``(data_step, salt)`` of training step ``step``."""
        data_step, salt = step, 0
        for entry in reversed(self.entries):
            if entry.kind == "skip" and data_step >= entry.start_step:
                data_step += entry.end_step - entry.start_step
            elif entry.kind == "reshuffle" and not salt and entry.start_step <= data_step:
                salt = entry.salt if data_step < entry.end_step else 0
        return data_step, salt

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": [
                {"kind": e.kind, "start_step": e.start_step, "end_step": e.end_step, "salt": e.salt}
                for e in self.entries
            ]
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str | None) -> DataLedger:
        if data is None:
            return cls()
        obj = json.loads(data) if isinstance(data, str) else data
        return cls(
            tuple(
                LedgerEntry(
                    kind=e["kind"],
                    start_step=int(e["start_step"]),
                    end_step=int(e["end_step"]),
                    salt=int(e["salt"]),
                )
                for e in obj.get("entries", ())
            )
        )


MAX_EVENTS = 1000


@dataclass(frozen=True)
class LrWindow:
    """A learning-rate multiplier over steps [start_step, end_step) (the lr_spike fault)."""

    start_step: int
    end_step: int  # exclusive
    factor: float


@dataclass
class RunLedger:
    FILE: ClassVar[str] = "ledger.json"

    data_entries: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    guard: dict[str, Any] | None = None  # guard state right after the last rewind
    at_step: int | None = None  # the step the last rewind went back to

    @property
    def data(self) -> DataLedger:
        return DataLedger.from_json({"entries": self.data_entries})

    def add_data_action(self, kind: str, start_step: int, end_step: int) -> None:
        """Reshuffle or skip the data of steps [start_step, end_step); salts never repeat."""
        salt = 1 + len(self.data_entries)
        self.data_entries.append(
            {"kind": kind, "start_step": start_step, "end_step": end_step, "salt": salt}
        )

    def record(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})
        del self.events[:-MAX_EVENTS]

    def merged(self, other: RunLedger) -> RunLedger:
        """Union of both ledgers' entries (order of first appearance)."""
        out = RunLedger(
            data_entries=_union(self.data_entries, other.data_entries),
            events=_union(self.events, other.events)[-MAX_EVENTS:],
            guard=other.guard if other.guard is not None else self.guard,
            at_step=other.at_step if other.at_step is not None else self.at_step,
        )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data_entries,
            "events": self.events,
            "guard": self.guard,
            "at_step": self.at_step,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None) -> RunLedger:
        if not obj:
            return cls()
        return cls(
            data_entries=list(obj.get("data", [])),
            events=list(obj.get("events", [])),
            guard=obj.get("guard"),
            at_step=obj.get("at_step"),
        )

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @staticmethod
    def loads(blob: bytes) -> dict[str, Any]:
        data = json.loads(blob)
        return data if isinstance(data, dict) else {}


def _union(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for entry in (*first, *second):
        key = json.dumps(entry, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out
