"""The run ledger: data decisions and divergence events of a run.

It travels in every checkpoint manifest (``meta.ledger``) and, at each rewind, is also written to
``<checkpoint.url>/<run_id>/ledger.json``: a rewind changes the data of steps after a checkpoint
that already exists, so a worker killed during the replay must find the decision somewhere
newer than that checkpoint. Entries are only ever added, so two ledgers merge by union.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from model.mixture import DataLedger

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
