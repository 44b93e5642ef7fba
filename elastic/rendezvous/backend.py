"""``EtcdRendezvousBackend``: torch's ``RendezvousBackend`` contract on etcd v3.

``get_state()`` returns the state bytes and the state key's ``mod_revision`` as the fencing
token; ``set_state(state, token)`` is one etcd transaction that writes only if the key's
``mod_revision`` still equals the token (``None``: only if no state exists) and, either way,
reads the key back in the same transaction. So a stale token costs one round trip and returns
the current state with ``has_set == False``. torch's ``DynamicRendezvousHandler`` runs the
algorithm (join, last call, keep-alive, dead-node removal) on top.

Contention: torch retries a lost compare-and-set at once. With N nodes joining together every
round of retries lets one writer through, so the attempts grow as N^2 and, once the clients
saturate their CPU, the keep-alive writes of the slowed round add more contenders still (128
participants: 21,000 attempts, 98 s). A lost compare-and-set therefore waits a random time
under a cap that doubles with each consecutive loss (``ConflictBackoff``, binary exponential
backoff as on a shared bus), then reads the state afresh, so torch's retry carries a current
token; a success resets the cap.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend, Token

from elastic.rendezvous.errors import EtcdStateError
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValue, KeyValueClient, Put
from elastic.rendezvous.leases import LeaseKeeper

BACKEND_NAME = "etcd3"


@dataclass
class ConflictBackoff:
    """Random wait after the n-th lost compare-and-set in a row: uniform in [0, base * 2^(n-1)]."""

    base_seconds: float = 0.002
    cap_seconds: float = 1.0
    sleep: Callable[[float], None] = time.sleep
    uniform: Callable[[float, float], float] = random.uniform
    consecutive_losses: int = field(default=0, init=False)

    def lost(self) -> float:
        """Record a lost compare-and-set and wait; returns the seconds waited."""
        self.consecutive_losses += 1
        window_seconds = min(
            self.cap_seconds, self.base_seconds * 2 ** (self.consecutive_losses - 1)
        )
        wait_seconds = self.uniform(0.0, window_seconds)
        self.sleep(wait_seconds)
        return wait_seconds

    def won(self) -> None:
        self.consecutive_losses = 0


class EtcdRendezvousBackend(RendezvousBackend):
    """Rendezvous state at ``<prefix>/<run_id>/rdzv/state`` under a ``LeaseKeeper`` lease."""

    def __init__(
        self,
        kv: KeyValueClient,
        *,
        keys: RunKeys,
        lease: LeaseKeeper,
        backoff: ConflictBackoff | None = None,
    ) -> None:
        self._kv = kv
        self._keys = keys
        self._lease = lease
        self._backoff = backoff or ConflictBackoff()

    @property
    def name(self) -> str:
        return BACKEND_NAME

    @property
    def key(self) -> str:
        return self._keys.state

    def get_state(self) -> tuple[bytes, Token] | None:
        return _decode(self._kv.get(self._keys.state), self._kv.endpoint)

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        expected = _expected_revision(token)
        if expected is None:  # not a token we issued: it cannot match
            current = self.get_state()
            return None if current is None else (*current, False)
        key = self._keys.state
        result = self._lease.write(
            lambda lease_id: self._kv.commit(
                key, expected_mod_revision=expected, ops=[Put(key, state, lease_id)]
            )
        )
        if result.succeeded:
            self._backoff.won()
            current = _decode(result.current, self._kv.endpoint)
        else:
            # Wait, then read afresh: the state read in the transaction is stale by now.
            self._backoff.lost()
            current = self.get_state()
        if current is None:
            return None
        return current[0], current[1], result.succeeded


def _expected_revision(token: Token | None) -> int | None:
    if token is None:
        return 0
    if isinstance(token, bool):
        return None
    try:
        revision = int(token)
    except (TypeError, ValueError):
        return None
    return revision if revision > 0 else None


def _decode(kv: KeyValue | None, endpoint: str) -> tuple[bytes, Token] | None:
    if kv is None:
        return None
    if not kv.value:
        raise EtcdStateError(f"etcd at {endpoint}: rendezvous state at {kv.key} is empty")
    return kv.value, kv.mod_revision
