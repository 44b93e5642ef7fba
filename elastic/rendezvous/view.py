"""``GroupView``: the run's ``group/`` prefix as one immutable :class:`Snapshot`, kept by a watch.

One prefix watch carries everything a member must react to: the latest round record, control
requests (scale, pause, rewind), round aborts and the node records (liveness: each under its
node's lease). Every change builds a new :class:`Snapshot` and swaps it in whole; readers take
``view.snapshot`` and never see half an update, and listeners get ``(old, new)``. After an etcd
outage the watch re-lists the prefix (``watching.PrefixWatch``), so no change is lost.

In steady state this costs no etcd request at all: the watch stream only carries changes.

Values are validated on read (``records``): a malformed or foreign value is logged once as one
line naming the key and ignored: a round record that cannot be read counts as no round (the next
opener overwrites it), an unreadable abort still aborts the round its key names, a bad node
record leaves the node's last good record (or none), a bad control document reads as empty.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from elastic import jsonlog
from elastic.rendezvous.errors import EtcdStateError
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValue, KeyValueClient, WatchEvent
from elastic.rendezvous.records import (
    AbortRecord,
    RecordError,
    RoundRecord,
    decode_abort,
    decode_node,
    decode_round,
    load,
)
from elastic.rendezvous.watching import PrefixWatch

log = jsonlog.get("elastic.rendezvous.view")


def _empty() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the group looked like at one etcd revision."""

    round: RoundRecord | None = None
    round_revision: int = 0  # mod_revision of the round key (0: absent): the CAS token
    highest_round: int = 0  # highest round number ever seen here: new rounds go above it
    nodes: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=_empty)
    aborts: Mapping[int, AbortRecord] = dataclasses.field(default_factory=_empty)
    control: Mapping[str, Any] = dataclasses.field(default_factory=_empty)

    @property
    def next_round(self) -> int:
        return self.highest_round + 1


Listener = Callable[[Snapshot, Snapshot], None]
ControlCheck = Callable[[Mapping[str, Any]], None]


class GroupView:
    """See the module docstring. ``check_control`` validates a control document (ValueError)."""

    def __init__(
        self,
        kv: KeyValueClient,
        keys: RunKeys,
        *,
        check_control: ControlCheck | None = None,
        retry_seconds: float = 0.5,
    ) -> None:
        self._keys = keys
        self._check_control = check_control
        self._snapshot = Snapshot()
        self._generation = 0
        self._changed = threading.Condition()
        self._listeners: list[Listener] = []
        self._watch = PrefixWatch(
            kv,
            keys.group,
            on_snapshot=self._on_snapshot,
            on_events=self._on_events,
            retry_seconds=retry_seconds,
        )

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, listener: Listener) -> None:
        """``listener(old, new)`` on the watch thread after every change (not for the first)."""
        self._listeners.append(listener)

    def start(self) -> GroupView:
        """First listing in the caller's thread (errors propagate), then watch."""
        self._watch.start()
        return self

    def close(self) -> None:
        self._watch.close()
        self.poke()

    @property
    def resyncs(self) -> int:
        return self._watch.resyncs

    @property
    def generation(self) -> int:
        """Bumped by every change and :meth:`poke`: what :meth:`wait` waits to move."""
        return self._generation

    def poke(self) -> None:
        """Wake :meth:`wait` callers (something else they wait on changed)."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def wait(self, generation: int, timeout_seconds: float) -> Snapshot:
        """Block while nothing changed since ``generation`` (at most the timeout)."""
        with self._changed:
            if self._generation == generation:
                self._changed.wait(max(0.0, timeout_seconds))
        return self._snapshot

    def wait_for(
        self, predicate: Callable[[Snapshot], bool], timeout_seconds: float
    ) -> Snapshot | None:
        """The first snapshot that satisfies ``predicate`` within the timeout (None: none)."""
        deadline = time.monotonic() + timeout_seconds
        with self._changed:
            while not predicate(self._snapshot):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)
            return self._snapshot

    # ------------------------------------------------------------------ building snapshots
    def _on_snapshot(self, kvs: list[KeyValue]) -> None:
        fields = _Fields(highest_round=self._snapshot.highest_round)
        for kv in kvs:
            self._apply(fields, kv.key, kv.value, kv.mod_revision, deleted=False)
        self._swap(fields.build())

    def _on_events(self, events: list[WatchEvent]) -> None:
        fields = _Fields.of(self._snapshot)
        for event in events:
            deleted = event.kind == "delete"
            self._apply(fields, event.key, event.value, event.mod_revision, deleted=deleted)
        self._swap(fields.build())

    def _swap(self, new: Snapshot) -> None:
        with self._changed:
            old, self._snapshot = self._snapshot, new
            self._generation += 1
            self._changed.notify_all()
        for listener in list(self._listeners):
            try:
                listener(old, new)
            # A failing listener must not end the watch for every later change.
            except Exception:
                log.exception("group_listener_failed")

    def _apply(
        self, fields: _Fields, key: str, value: bytes, revision: int, *, deleted: bool
    ) -> None:
        name = key[len(self._keys.group) :]
        try:
            if name == "round":
                fields.set_round(None if deleted else decode_round(key, value), revision, deleted)
            elif name == "control":
                fields.control = {} if deleted else self._control(key, value)
            elif key.startswith(self._keys.aborts):
                fields.set_abort(key, name.rsplit("/", 1)[-1], value, deleted)
            elif key.startswith(self._keys.nodes):
                node = key[len(self._keys.nodes) :]
                if deleted:
                    fields.nodes.pop(node, None)
                else:
                    fields.nodes[node] = MappingProxyType(decode_node(key, value))
            else:
                log.warning("etcd_value_ignored", key=key, error="not a key this version writes")
        except EtcdStateError as exc:
            log.warning("etcd_value_ignored", key=key, error=str(exc))
            if name == "round":
                fields.set_round(None, revision, deleted=False)
            elif name == "control":  # as documented, and as a re-list reads it
                fields.control = {}

    def _control(self, key: str, value: bytes) -> dict[str, Any]:
        data = load(key, value)
        seq = data.get("seq", 0)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:  # readers int() it
            raise RecordError(key, f"seq={seq!r} is not valid")
        if self._check_control is not None:
            try:
                self._check_control({k: v for k, v in data.items() if k != "seq"})
            except ValueError as exc:
                raise RecordError(key, str(exc)) from None
        return data


@dataclasses.dataclass
class _Fields:
    """A snapshot under construction (the watch thread's scratch copy)."""

    round: RoundRecord | None = None
    round_revision: int = 0
    highest_round: int = 0
    nodes: dict[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    aborts: dict[int, AbortRecord] = dataclasses.field(default_factory=dict)
    control: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, snapshot: Snapshot) -> _Fields:
        return cls(
            round=snapshot.round,
            round_revision=snapshot.round_revision,
            highest_round=snapshot.highest_round,
            nodes=dict(snapshot.nodes),
            aborts=dict(snapshot.aborts),
            control=snapshot.control,
        )

    def set_round(self, record: RoundRecord | None, revision: int, deleted: bool) -> None:
        self.round, self.round_revision = record, 0 if deleted else revision
        if record is not None:
            self.highest_round = max(self.highest_round, record.round)

    def set_abort(self, key: str, suffix: str, value: bytes, deleted: bool) -> None:
        if not suffix.isdigit():
            raise RecordError(key, "not an abort key of a round")
        round_id = int(suffix)
        if deleted:
            self.aborts.pop(round_id, None)
            return
        try:
            self.aborts[round_id] = decode_abort(key, value)
        except RecordError as exc:
            # Still an abort: stopping a round is the safe reading of a value we cannot read.
            self.aborts[round_id] = AbortRecord(node="?", detail=str(exc))
            raise

    def build(self) -> Snapshot:
        return Snapshot(
            round=self.round,
            round_revision=self.round_revision,
            highest_round=self.highest_round,
            nodes=MappingProxyType(self.nodes),
            aborts=MappingProxyType(self.aborts),
            control=MappingProxyType(dict(self.control)),
        )
