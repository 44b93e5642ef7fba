"""The key-value contract this package needs from etcd, and its value types.

Two implementations: ``etcd_client.EtcdClient`` (a real etcd v3 server, the only module that
imports ``etcd3``) and ``memory.InMemoryEtcd`` (unit tests). Everything else (backend, store,
leases, watches, run store) is written against :class:`KeyValueClient`, so one contract test
covers both.

Semantics follow etcd v3: every write bumps a cluster-wide ``revision``; a key's
``mod_revision`` is the revision of its last write and is ``0`` for an absent key, which makes
it the fencing token of a compare-and-set. Keys attached to a lease vanish when it expires.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal


@dataclasses.dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease_id: int  # 0: no lease


@dataclasses.dataclass(frozen=True)
class Put:
    """Transaction operation: write ``value`` at ``key`` (attached to ``lease_id`` if set)."""

    key: str
    value: bytes
    lease_id: int | None = None


@dataclasses.dataclass(frozen=True)
class DeleteRange:
    """Transaction operation: delete keys in ``[start, end)``; ``end=None`` deletes one key."""

    start: str
    end: str | None = None


Op = Put | DeleteRange


@dataclasses.dataclass(frozen=True)
class TxnResult:
    """Outcome of :meth:`KeyValueClient.commit`; ``current`` is ``key`` after the txn."""

    succeeded: bool
    current: KeyValue | None
    revision: int


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes  # empty for deletes
    mod_revision: int


class WatchHandle(abc.ABC):
    """A running watch; ``cancel()`` stops it and is idempotent."""

    @abc.abstractmethod
    def cancel(self) -> None: ...


EventsCallback = Callable[[list[WatchEvent]], None]
ErrorCallback = Callable[[Exception], None]


def prefix_end(prefix: str) -> str:
    """The exclusive end of the key range that starts with ``prefix`` (etcd's convention)."""
    data = bytearray(prefix.encode())
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return bytes(data).decode(errors="surrogateescape")
        data.pop()
    return "\0"


class KeyValueClient(abc.ABC):
    """What the rendezvous needs from etcd. Every method may raise an ``EtcdRendezvousError``."""

    @property
    @abc.abstractmethod
    def endpoint(self) -> str:
        """The endpoint(s) in use, for messages."""

    @abc.abstractmethod
    def get(self, key: str) -> KeyValue | None: ...

    @abc.abstractmethod
    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys starting with ``prefix`` (sorted) and the revision they were read at."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes, *, lease_id: int | None = None) -> int:
        """Write unconditionally; return the new revision."""

    @abc.abstractmethod
    def commit(self, key: str, *, expected_mod_revision: int, ops: Sequence[Op]) -> TxnResult:
        """Apply ``ops`` atomically iff ``key``'s mod_revision equals the expected one.

        ``expected_mod_revision=0`` means "``key`` must be absent". Either way the result
        carries ``key`` as it is after the transaction, read in the same transaction.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete one key; True if it existed."""

    @abc.abstractmethod
    def delete_range(self, start: str, end: str) -> int:
        """Delete keys in ``[start, end)``; return how many."""

    def delete_prefix(self, prefix: str) -> int:
        return self.delete_range(prefix, prefix_end(prefix))

    @abc.abstractmethod
    def grant_lease(self, ttl_seconds: int) -> int:
        """A new lease id; keys put with it vanish ``ttl_seconds`` after the last refresh."""

    @abc.abstractmethod
    def refresh_lease(self, lease_id: int) -> int:
        """Keep the lease alive; return its TTL, 0 when it has expired or was revoked."""

    @abc.abstractmethod
    def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease (its keys are deleted at once); an unknown lease is fine."""

    @abc.abstractmethod
    def watch_prefix(
        self,
        prefix: str,
        *,
        start_revision: int,
        on_events: EventsCallback,
        on_error: ErrorCallback,
    ) -> WatchHandle:
        """Report changes under ``prefix`` from ``start_revision`` on, in order.

        ``on_events`` runs on a background thread. When the watch breaks (connection lost,
        revision compacted) ``on_error`` runs once and the watch is over: the caller re-lists
        and watches again (see ``watching.PrefixWatch``).
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and stop watches; idempotent."""
