"""The round protocol: open a round, join it with one put, close it with one compare-and-set.

Every participant holds a lease (the daemon's node lease) and a ``GroupView`` of ``group/``.

1. **Open**: when the latest round is closed and this node needs a new one (it is not in it, or
   the round is one it already left), it moves ``group/round`` from that record to
   ``open(next_round, opener=me)`` by compare-and-set on the key's mod_revision. Losing the race
   is fine: someone else opened it. Running members see the newer round through their watch and
   regroup at their next step boundary (a newcomer is how a group grows).
2. **Join**: one put of ``joins/<round>/<name>`` under the joiner's lease: where it can be
   reached, and the port it would serve the round's store on as rank 0. A joiner that dies
   takes its join key with its lease.
3. **Close**: only the opener watches ``joins/<round>/``. It closes the round with one
   compare-and-set on the open record when ``max_nodes`` have joined, or ``min_nodes`` have and
   either every node the caller expects has joined (``expected``: live nodes that are not
   leaving; not in round 1, when peers may not have registered yet) or the last call has passed
   since ``min_nodes`` were reached. The closed record lists the participants sorted by name
   (ranks follow from the order; more than ``max_nodes``: members of the previous round first,
   then by join order) and the rank-0 node's address and port. The same transaction deletes the
   join keys, aborts and stores of earlier rounds. If the opener's node record disappears while
   the round is open, a participant takes over as opener by compare-and-set.

Writes per round: N joins + open + close = N + 2. Nothing is polled: a joiner waits on its view
(and the opener on its join watch); the only timer is the last call.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping

from elastic import jsonlog
from elastic.rendezvous.errors import EtcdRendezvousError, RoundTimeout
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import DeleteRange, KeyValue, KeyValueClient, Op, Put, WatchEvent
from elastic.rendezvous.records import JoinRecord, RecordError, RoundRecord, decode_join
from elastic.rendezvous.view import GroupView, Snapshot
from elastic.rendezvous.watching import PrefixWatch

log = jsonlog.get("elastic.rendezvous.rounds")
Expected = Callable[[Snapshot], set[str]]
IDLE_WAIT_SECONDS = 5.0  # a waiting joiner re-checks its deadline this often (no etcd call)
# A lost compare-and-set means the view has not caught up yet: wait that long, do not spin.
MIN_WAIT_SECONDS = 0.01


@dataclasses.dataclass(frozen=True)
class JoinSettings:
    min_nodes: int
    max_nodes: int
    last_call_seconds: float
    timeout_seconds: float


def _is_mine(record: RoundRecord | None, name: str, *, after_round: int) -> bool:
    """A closed round newer than ``after_round`` that lists ``name``."""
    if record is None or not record.closed or record.round <= after_round:
        return False
    return name in record.participants


class JoinWatch:
    """The opener's view of ``joins/<round>/``: ``{name: (record, create_revision)}``."""

    def __init__(self, kv: KeyValueClient, prefix: str, *, on_change: Callable[[], None]) -> None:
        self._prefix = prefix
        self._on_change = on_change
        self._lock = threading.Lock()
        self._joins: dict[str, tuple[JoinRecord, int]] = {}
        self._watch = PrefixWatch(kv, prefix, on_snapshot=self._snapshot, on_events=self._events)

    def start(self) -> JoinWatch:
        self._watch.start()
        return self

    def close(self) -> None:
        self._watch.close()

    def joins(self) -> dict[str, tuple[JoinRecord, int]]:
        with self._lock:
            return dict(self._joins)

    def _read(self, key: str, value: bytes) -> JoinRecord | None:
        try:
            return decode_join(key, value)
        except RecordError as exc:
            log.warning("etcd_value_ignored", key=key, error=str(exc))
            return None

    def _snapshot(self, kvs: list[KeyValue]) -> None:
        joins = {}
        for kv in kvs:
            record = self._read(kv.key, kv.value)
            if record is not None:
                joins[record.name] = (record, kv.create_revision)
        with self._lock:
            self._joins = joins
        self._on_change()

    def _events(self, events: list[WatchEvent]) -> None:
        with self._lock:
            for event in events:
                name = event.key[len(self._prefix) :]
                if event.kind == "delete":
                    self._joins.pop(name, None)
                    continue
                record = self._read(event.key, event.value)
                if record is not None:
                    self._joins.setdefault(name, (record, event.mod_revision))
        self._on_change()


class RoundJoiner:
    """One participant's side of the protocol (module docstring)."""

    def __init__(
        self,
        kv: KeyValueClient,
        keys: RunKeys,
        view: GroupView,
        *,
        name: str,
        addr: str,
        lease_id: Callable[[], int | None],
        port: Callable[[], int],
        expected: Expected,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kv, self._keys, self._view = kv, keys, view
        self.name, self._addr = name, addr
        self._lease_id, self._port, self._expected = lease_id, port, expected
        self._clock = clock
        self._joined: int | None = None  # the round our join key is in
        self._closer: _Closer | None = None

    def join(
        self,
        settings: JoinSettings,
        *,
        after_round: int,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> RoundRecord | None:
        """The next closed round (> ``after_round``) with this node in it; None if
        ``should_stop()``; ``RoundTimeout`` after ``settings.timeout_seconds``."""
        deadline = self._clock() + settings.timeout_seconds
        try:
            while True:
                generation, snap = self._view.generation, self._view.snapshot
                record = snap.round
                if _is_mine(record, self.name, after_round=after_round):
                    assert record is not None
                    return record
                if should_stop():
                    self._withdraw()
                    return None
                if self._clock() >= deadline:
                    self._withdraw()
                    raise RoundTimeout(
                        f"no round formed within {settings.timeout_seconds:g} s "
                        f"(min_nodes {settings.min_nodes}, live nodes {len(snap.nodes)})"
                    )
                wait_seconds = self._step(snap, settings, after_round=after_round)
                self._view.wait(
                    generation, max(MIN_WAIT_SECONDS, min(wait_seconds, deadline - self._clock()))
                )
        finally:
            self._stop_closing()

    def withdraw(self) -> None:
        """Leave an open round on purpose (drain): delete this node's join key."""
        self._withdraw()

    # ------------------------------------------------------------------ one pass
    def _step(self, snap: Snapshot, settings: JoinSettings, *, after_round: int) -> float:
        record = snap.round
        if record is None or record.closed:
            if self._should_open(record, settings, after_round=after_round):
                self._open(snap, settings)
            return IDLE_WAIT_SECONDS
        if self._joined != record.round:
            self._put_join(record.round)
        if record.opener == self.name:
            return self._close_if_due(snap, record, settings)
        if record.opener not in snap.nodes:
            self._take_over(snap, record)
        return IDLE_WAIT_SECONDS

    def _should_open(
        self, record: RoundRecord | None, settings: JoinSettings, *, after_round: int
    ) -> bool:
        if record is None:
            return True
        if record.round <= after_round and self.name in record.participants:
            return True  # this node left that round (its workers stopped): the group re-forms
        # A round without this node: ask for another unless it is full.
        return len(record.participants) < settings.max_nodes

    def _open(self, snap: Snapshot, settings: JoinSettings) -> None:
        opened = RoundRecord(
            round=snap.next_round,
            state="open",
            opener=self.name,
            min_nodes=settings.min_nodes,
            max_nodes=settings.max_nodes,
        )
        self._cas(snap.round_revision, opened)

    def _take_over(self, snap: Snapshot, record: RoundRecord) -> None:
        log.info("round_opener_gone", round=record.round, opener=record.opener, node=self.name)
        self._cas(snap.round_revision, dataclasses.replace(record, opener=self.name))

    def _cas(self, expected_revision: int, record: RoundRecord, *extra: DeleteRange) -> bool:
        key = self._keys.round
        ops: list[Op] = [Put(key, record.to_bytes()), *extra]
        return self._kv.commit(key, expected_mod_revision=expected_revision, ops=ops).succeeded

    def _put_join(self, round_id: int) -> None:
        join = JoinRecord(name=self.name, addr=self._addr, port=self._port())
        key = self._keys.joins(round_id) + self.name
        self._kv.put(key, join.to_bytes(), lease_id=self._lease_id())
        self._joined = round_id

    def _withdraw(self) -> None:
        if self._joined is None:
            return
        key, self._joined = self._keys.joins(self._joined) + self.name, None
        try:
            self._kv.delete(key)
        # Not fatal: the key goes with the lease, and a closed round that lists us is ours.
        except EtcdRendezvousError as exc:
            log.warning("join_withdraw_failed", key=key, error=str(exc))

    # ------------------------------------------------------------------ closing
    def _close_if_due(self, snap: Snapshot, record: RoundRecord, settings: JoinSettings) -> float:
        closer = self._closer
        if closer is None or closer.round != record.round:
            self._stop_closing()
            closer = self._closer = _Closer(self._kv, self._keys, record.round, self._view)
        joins = closer.joins.joins()
        now = self._clock()
        if len(joins) >= settings.min_nodes and closer.min_reached_at is None:
            closer.min_reached_at = now
        elif len(joins) < settings.min_nodes:
            closer.min_reached_at = None
        due, wait_seconds = self._due(snap, record, settings, joins, closer.min_reached_at, now)
        if due:
            self._close(snap, record, settings, joins)
        return wait_seconds

    def _due(
        self,
        snap: Snapshot,
        record: RoundRecord,
        settings: JoinSettings,
        joins: Mapping[str, tuple[JoinRecord, int]],
        min_reached_at: float | None,
        now: float,
    ) -> tuple[bool, float]:
        if len(joins) >= settings.max_nodes:
            return True, IDLE_WAIT_SECONDS
        if min_reached_at is None:
            return False, IDLE_WAIT_SECONDS
        if record.round > 1 and self._expected(snap) <= set(joins):
            return True, IDLE_WAIT_SECONDS
        remaining = min_reached_at + settings.last_call_seconds - now
        return remaining <= 0, max(remaining, 0.0)

    def _close(
        self,
        snap: Snapshot,
        record: RoundRecord,
        settings: JoinSettings,
        joins: Mapping[str, tuple[JoinRecord, int]],
    ) -> None:
        previous = set(self._previous_participants)
        chosen = sorted(joins, key=lambda n: (n not in previous, joins[n][1], n))
        participants = tuple(sorted(chosen[: settings.max_nodes]))
        master = joins[participants[0]][0]
        closed = dataclasses.replace(
            record,
            state="closed",
            participants=participants,
            master_addr=master.addr,
            master_port=master.port,
            min_nodes=settings.min_nodes,
            max_nodes=settings.max_nodes,
        )
        keys = self._keys
        purge = (
            DeleteRange(keys.joins_root, keys.joins(record.round)),
            DeleteRange(keys.aborts, keys.abort(record.round)),
            DeleteRange(keys.store_root, keys.store(record.round)),
        )
        if self._cas(snap.round_revision, closed, *purge):
            log.info("round_closed", round=record.round, participants=len(participants))

    @property
    def _previous_participants(self) -> tuple[str, ...]:
        return self._last_closed.participants if self._last_closed is not None else ()

    _last_closed: RoundRecord | None = None

    def remember(self, record: RoundRecord) -> None:
        """The round this node last trained in (its members are preferred when over max)."""
        self._last_closed = record

    def _stop_closing(self) -> None:
        if self._closer is not None:
            self._closer.joins.close()
            self._closer = None


class _Closer:
    """The opener's state for one round: its join watch and when ``min_nodes`` was reached."""

    def __init__(self, kv: KeyValueClient, keys: RunKeys, round_id: int, view: GroupView) -> None:
        self.round = round_id
        self.min_reached_at: float | None = None
        self.joins = JoinWatch(kv, keys.joins(round_id), on_change=view.poke).start()
