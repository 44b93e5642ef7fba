"""``EtcdRendezvousBackend``: torch's ``RendezvousBackend`` contract on etcd v3.

``get_state()`` returns the state bytes and the state key's ``mod_revision`` as the fencing
token; ``set_state(state, token)`` is one etcd transaction that writes only if the key's
``mod_revision`` still equals the token (``None``: only if no state exists) and, either way,
reads the key back in the same transaction. So a stale token costs one round trip and returns
the current state with ``has_set == False``. torch's ``DynamicRendezvousHandler`` runs the
algorithm (join, last call, keep-alive, dead-node removal) on top.
"""

from __future__ import annotations

from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend, Token

from elastic.rendezvous.errors import EtcdStateError
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValue, KeyValueClient, Put
from elastic.rendezvous.leases import LeaseKeeper

BACKEND_NAME = "etcd3"


class EtcdRendezvousBackend(RendezvousBackend):
    """Rendezvous state at ``<prefix>/<run_id>/rdzv/state`` under a ``LeaseKeeper`` lease."""

    def __init__(self, kv: KeyValueClient, *, keys: RunKeys, lease: LeaseKeeper) -> None:
        self._kv = kv
        self._keys = keys
        self._lease = lease

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
        current = _decode(result.current, self._kv.endpoint)
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
