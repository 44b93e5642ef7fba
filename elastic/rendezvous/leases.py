"""``LeaseKeeper``: the lease that this process's rendezvous writes (state, store) hang on.

The rendezvous state and store keys must outlive any single node yet vanish when a whole run is
abandoned. Each process attaches its writes to its own lease of ``state_ttl_seconds`` and
refreshes the lease whenever it writes and a third of the TTL has passed; torch's keep-alive
rewrites the state every few seconds, so the keys live while anyone in the run lives and expire
one TTL after the last writer went quiet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from elastic.rendezvous.errors import EtcdLeaseNotFoundError
from elastic.rendezvous.kv import KeyValueClient

T = TypeVar("T")


class LeaseKeeper:
    """Grants a lease lazily, refreshes it on use, re-grants it when etcd forgot it."""

    def __init__(
        self,
        kv: KeyValueClient,
        *,
        ttl_seconds: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kv = kv
        self._ttl_seconds = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._lease_id: int | None = None
        self._refreshed_at = 0.0

    @property
    def ttl_seconds(self) -> int:
        return self._ttl_seconds

    def lease_id(self) -> int:
        """A live lease id (a cached one while it was refreshed less than TTL/3 ago)."""
        with self._lock:
            now = self._clock()
            if self._lease_id is not None and now - self._refreshed_at > self._ttl_seconds / 3:
                if self._kv.refresh_lease(self._lease_id) <= 0:
                    self._lease_id = None
                self._refreshed_at = now
            if self._lease_id is None:
                self._lease_id = self._kv.grant_lease(self._ttl_seconds)
                self._refreshed_at = now
            return self._lease_id

    def write(self, fn: Callable[[int], T]) -> T:
        """``fn(lease_id)``; when etcd no longer knows the lease, grant a new one and retry once."""
        lease_id = self.lease_id()
        try:
            return fn(lease_id)
        except EtcdLeaseNotFoundError:
            with self._lock:
                if self._lease_id == lease_id:
                    self._lease_id = None
            return fn(self.lease_id())
