"""An in-memory etcd for unit tests: same ``KeyValueClient`` contract, no network, no sleeps.

``InMemoryEtcd`` is the "server" (revisions, leases, watch history); ``client()`` hands out
``InMemoryClient`` objects, so "reconnect" means closing one client and opening another.
Time comes from an injectable clock; leases expire when an operation (or ``expire_leases()``)
sees the clock past their deadline. ``disconnect()`` makes every call fail with
``EtcdUnavailableError`` and breaks every watch, ``reconnect()`` heals it: the failure modes the
real adapter reports. Watch callbacks run on the writer's thread, after the write.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence

from elastic.rendezvous.errors import (
    EtcdConnectionError,
    EtcdLeaseNotFoundError,
    EtcdUnavailableError,
)
from elastic.rendezvous.kv import (
    DeleteRange,
    ErrorCallback,
    EventsCallback,
    KeyValue,
    KeyValueClient,
    Op,
    Put,
    TxnResult,
    WatchEvent,
    WatchHandle,
    prefix_end,
)

ENDPOINT = "memory"


@dataclasses.dataclass
class _Lease:
    ttl_seconds: int
    deadline: float
    keys: set[str]


@dataclasses.dataclass(eq=False)
class _Watcher(WatchHandle):
    server: InMemoryEtcd
    start: str
    end: str
    on_events: EventsCallback
    on_error: ErrorCallback

    def cancel(self) -> None:
        self.server._remove_watcher(self)


class InMemoryEtcd:
    """The shared state behind any number of ``InMemoryClient`` objects."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._data: dict[str, KeyValue] = {}
        self._history: list[WatchEvent] = []
        self._revision = 1  # etcd starts at 1 too
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._watchers: list[_Watcher] = []
        self._connected = True

    def client(self) -> InMemoryClient:
        return InMemoryClient(self)

    @property
    def revision(self) -> int:
        return self._revision

    # -- failure injection -------------------------------------------------------------------

    def disconnect(self) -> None:
        """Every call fails as if etcd were down; every watch breaks (``on_error``)."""
        with self._lock:
            self._connected = False
            watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.on_error(EtcdUnavailableError("etcd at memory: down", endpoint=ENDPOINT))

    def reconnect(self) -> None:
        with self._lock:
            self._connected = True

    def expire_leases(self) -> None:
        """Apply lease expiry now (also done at the start of every call)."""
        self._dispatch(self._expire())

    def revoke_all_leases(self) -> None:
        """As if etcd lost every lease (e.g. a node stayed partitioned past its TTL)."""
        with self._lock:
            events = [e for lease_id in list(self._leases) for e in self._revoke(lease_id)]
        self._dispatch(events)

    # -- internals (called by InMemoryClient) ------------------------------------------------

    def _check(self) -> None:
        if not self._connected:
            raise EtcdUnavailableError("etcd at memory: down", endpoint=ENDPOINT)

    def _expire(self) -> list[WatchEvent]:
        with self._lock:
            now = self._clock()
            dead = [i for i, lease in self._leases.items() if lease.deadline <= now]
            return [e for lease_id in dead for e in self._revoke(lease_id)]

    def _revoke(self, lease_id: int) -> list[WatchEvent]:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return []
        events = [self._delete_key(key) for key in sorted(lease.keys)]
        return [e for e in events if e is not None]

    def _bump(self) -> int:
        self._revision += 1
        return self._revision

    def _put_key(self, put: Put, revision: int) -> WatchEvent:
        if put.lease_id and put.lease_id not in self._leases:
            raise EtcdLeaseNotFoundError(f"etcd at memory: lease {put.lease_id:x} not found")
        old = self._data.get(put.key)
        if old is not None and old.lease_id in self._leases:
            self._leases[old.lease_id].keys.discard(put.key)
        if put.lease_id:
            self._leases[put.lease_id].keys.add(put.key)
        self._data[put.key] = KeyValue(
            key=put.key,
            value=put.value,
            mod_revision=revision,
            create_revision=old.create_revision if old else revision,
            lease_id=put.lease_id or 0,
        )
        event = WatchEvent("put", put.key, put.value, revision)
        self._history.append(event)
        return event

    def _delete_key(self, key: str, revision: int | None = None) -> WatchEvent | None:
        old = self._data.pop(key, None)
        if old is None:
            return None
        if old.lease_id in self._leases:
            self._leases[old.lease_id].keys.discard(key)
        event = WatchEvent("delete", key, b"", revision or self._bump())
        self._history.append(event)
        return event

    def _apply(self, ops: Sequence[Op]) -> list[WatchEvent]:
        for op in ops:  # validate first: a transaction is all or nothing
            if isinstance(op, Put) and op.lease_id and op.lease_id not in self._leases:
                raise EtcdLeaseNotFoundError(f"etcd at memory: lease {op.lease_id:x} not found")
        revision = self._bump()
        events: list[WatchEvent] = []
        for op in ops:
            if isinstance(op, Put):
                events.append(self._put_key(op, revision))
            else:
                end = op.end if op.end is not None else op.start + "\0"
                for key in [k for k in sorted(self._data) if op.start <= k < end]:
                    event = self._delete_key(key, revision)
                    if event is not None:
                        events.append(event)
        if not events:
            self._revision -= 1  # etcd does not bump the revision for a no-op
        return events

    def _dispatch(self, events: list[WatchEvent]) -> None:
        if not events:
            return
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            mine = [e for e in events if watcher.start <= e.key < watcher.end]
            if mine:
                watcher.on_events(mine)

    def _remove_watcher(self, watcher: _Watcher) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)


class InMemoryClient(KeyValueClient):
    """One connection to an ``InMemoryEtcd``."""

    def __init__(self, server: InMemoryEtcd) -> None:
        self._server = server
        self._closed = False
        self._watchers: list[_Watcher] = []

    @property
    def endpoint(self) -> str:
        return ENDPOINT

    def _enter(self) -> InMemoryEtcd:
        if self._closed:
            raise EtcdConnectionError("etcd client is closed", endpoint=ENDPOINT)
        server = self._server
        server._check()
        server._dispatch(server._expire())
        return server

    def get(self, key: str) -> KeyValue | None:
        server = self._enter()
        with server._lock:
            return server._data.get(key)

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        server = self._enter()
        end = prefix_end(prefix)
        with server._lock:
            kvs = [kv for key, kv in sorted(server._data.items()) if prefix <= key < end]
            return kvs, server._revision

    def put(self, key: str, value: bytes, *, lease_id: int | None = None) -> int:
        server = self._enter()
        with server._lock:
            events = server._apply([Put(key, value, lease_id)])
            revision = server._revision
        server._dispatch(events)
        return revision

    def commit(self, key: str, *, expected_mod_revision: int, ops: Sequence[Op]) -> TxnResult:
        server = self._enter()
        with server._lock:
            current = server._data.get(key)
            succeeded = (current.mod_revision if current else 0) == expected_mod_revision
            events = server._apply(ops) if succeeded else []
            result = TxnResult(succeeded, server._data.get(key), server._revision)
        server._dispatch(events)
        return result

    def delete(self, key: str) -> bool:
        return self.delete_range(key, key + "\0") > 0

    def delete_range(self, start: str, end: str) -> int:
        server = self._enter()
        with server._lock:
            events = server._apply([DeleteRange(start, end)])
        server._dispatch(events)
        return len(events)

    def grant_lease(self, ttl_seconds: int) -> int:
        server = self._enter()
        with server._lock:
            lease_id = next(server._lease_ids)
            server._leases[lease_id] = _Lease(ttl_seconds, server._clock() + ttl_seconds, set())
            return lease_id

    def refresh_lease(self, lease_id: int) -> int:
        server = self._enter()
        with server._lock:
            lease = server._leases.get(lease_id)
            if lease is None:
                return 0
            lease.deadline = server._clock() + lease.ttl_seconds
            return lease.ttl_seconds

    def revoke_lease(self, lease_id: int) -> None:
        server = self._enter()
        with server._lock:
            events = server._revoke(lease_id)
        server._dispatch(events)

    def watch_prefix(
        self,
        prefix: str,
        *,
        start_revision: int,
        on_events: EventsCallback,
        on_error: ErrorCallback,
    ) -> WatchHandle:
        server = self._enter()
        watcher = _Watcher(server, prefix, prefix_end(prefix), on_events, on_error)
        with server._lock:
            backlog = [
                e
                for e in server._history
                if e.mod_revision >= start_revision and prefix <= e.key < watcher.end
            ]
            server._watchers.append(watcher)
        self._watchers.append(watcher)
        if backlog:
            on_events(backlog)
        return watcher

    def close(self) -> None:
        self._closed = True
        for watcher in self._watchers:
            watcher.cancel()
