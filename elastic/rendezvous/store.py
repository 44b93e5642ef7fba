"""``EtcdStore``: a c10d ``Store`` on etcd v3, one key namespace per rendezvous round.

torch's handler returns a Store with each round; the agent uses it for rank assignment, the
bootstrap ``MASTER_ADDR``/``MASTER_PORT`` exchange and its exit barrier. Each round gets its own
prefix (``keys.RunKeys.store(round)``) and the handler deletes earlier rounds once a new one has
formed, so no key of an old round is ever read in a new one (the stale-key failure of
pytorch/pytorch#167288). Keys hang on the ``LeaseKeeper`` lease, so an abandoned run's store
disappears with its state.

Blocking reads (``get``, ``wait``) poll with a capped backoff until the store timeout: simple,
and immune to watch breaks during an etcd restart; the poll cap keeps the extra latency below
what torch's own 1 s rendezvous polling adds anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch.distributed as dist

from elastic.rendezvous.kv import KeyValue, KeyValueClient, Put
from elastic.rendezvous.leases import LeaseKeeper

_FIRST_POLL_SECONDS = 0.005
_MAX_POLL_SECONDS = 0.1
_MAX_CAS_ATTEMPTS = 1000


def _to_bytes(value: str | bytes | bytearray) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class EtcdStore(dist.Store):
    """c10d Store under ``prefix``: set/get/add/compare_set/wait/check/multi_*/append/delete."""

    def __init__(
        self,
        kv: KeyValueClient,
        *,
        prefix: str,
        lease: LeaseKeeper | None = None,
        timeout: timedelta | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()  # the pybind trampoline needs this before anything else
        self._kv = kv
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._lease = lease
        self._clock = clock
        self._sleep = sleep
        if timeout is not None:
            self.set_timeout(timeout)

    def _timeout(self) -> timedelta:
        timeout: timedelta = self.timeout  # type: ignore[attr-defined]  # pybind property
        return timeout

    @property
    def prefix(self) -> str:
        return self._prefix

    def _key(self, key: str | bytes) -> str:
        return self._prefix + (key.decode() if isinstance(key, bytes) else key)

    def _put(self, key: str, value: bytes) -> None:
        if self._lease is None:
            self._kv.put(key, value)
            return
        self._lease.write(lambda lease_id: self._kv.put(key, value, lease_id=lease_id))

    def _update(self, key: str, change: Callable[[bytes | None], bytes]) -> bytes:
        """Compare-and-set loop: write ``change(current)`` unless the key moved meanwhile."""
        for _ in range(_MAX_CAS_ATTEMPTS):
            current = self._kv.get(key)
            new = change(current.value if current else None)
            if self._commit(key, new, current.mod_revision if current else 0):
                return new
        raise RuntimeError(f"EtcdStore: {key} changed under us {_MAX_CAS_ATTEMPTS} times")

    def _commit(self, key: str, value: bytes, expected: int) -> bool:
        def txn(lease_id: int | None) -> bool:
            op = Put(key, value, lease_id)
            return self._kv.commit(key, expected_mod_revision=expected, ops=[op]).succeeded

        if self._lease is None:
            return txn(None)
        return self._lease.write(txn)

    # -- c10d Store API ----------------------------------------------------------------------

    def set(self, key: str, value: str | bytes) -> None:
        self._put(self._key(key), _to_bytes(value))

    def get(self, key: str) -> bytes:
        return self._wait_for([self._key(key)], self._timeout())[0].value

    def add(self, key: str, amount: int) -> int:
        new = self._update(self._key(key), lambda cur: str(int(cur or b"0") + amount).encode())
        return int(new)

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        """TCPStore semantics: set if the value equals ``expected`` (absent matches ``b""``);
        return the value now stored, or ``expected`` for an absent key that did not match."""
        full_key = self._key(key)
        expected, desired = _to_bytes(expected_value), _to_bytes(desired_value)
        for _ in range(_MAX_CAS_ATTEMPTS):
            current = self._kv.get(full_key)
            if current is None and expected != b"":
                return expected
            if current is not None and current.value != expected:
                return current.value
            if self._commit(full_key, desired, current.mod_revision if current else 0):
                return desired
        raise RuntimeError(f"EtcdStore: {full_key} changed under us {_MAX_CAS_ATTEMPTS} times")

    def append(self, key: str, value: str | bytes) -> None:
        suffix = _to_bytes(value)
        self._update(self._key(key), lambda cur: (cur or b"") + suffix)

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        self._wait_for([self._key(k) for k in keys], timeout or self._timeout())

    def check(self, keys: Sequence[str]) -> bool:
        return all(self._kv.get(self._key(k)) is not None for k in keys)

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        return [kv.value for kv in self._wait_for([self._key(k) for k in keys], self._timeout())]

    def multi_set(self, keys: Sequence[str], values: Sequence[str | bytes]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    def delete_key(self, key: str) -> bool:
        return self._kv.delete(self._key(key))

    def num_keys(self) -> int:
        kvs, _ = self._kv.get_prefix(self._prefix)
        return len(kvs)

    def _wait_for(self, keys: list[str], timeout: timedelta) -> list[KeyValue]:
        deadline = self._clock() + timeout.total_seconds()
        found: dict[str, KeyValue] = {}
        delay = _FIRST_POLL_SECONDS
        while True:
            for key in keys:
                if key not in found and (kv := self._kv.get(key)) is not None:
                    found[key] = kv
            if len(found) == len(keys):
                return [found[k] for k in keys]
            if self._clock() + delay > deadline:
                missing = [k for k in keys if k not in found]
                raise dist.DistStoreError(
                    f"EtcdStore at {self._kv.endpoint}: wait timeout after "
                    f"{timeout.total_seconds():g} s, missing keys: {missing}"
                )
            self._sleep(delay)
            delay = min(delay * 2, _MAX_POLL_SECONDS)
