"""The pre-issue-17 design, kept only to compare against.

Usage: ``python -m bench.legacy_rendezvous round|idle --endpoint HOST:PORT --nodes N
[--keep-alive 1] [--window 20]``: prints one JSON line (round seconds; or the etcd revisions
and database bytes written per second in steady state).

Recreated from ``elastic/rendezvous/backend.py`` and ``handler.py`` as they were before issue 17:
torch's ``DynamicRendezvousHandler`` runs its algorithm over one pickled state blob at
``<prefix>/<run_id>/rdzv/state``, written by compare-and-set on its mod_revision under a lease
(``_LeaseKeeper``); a lost compare-and-set waits a random binary-exponential backoff
(``_ConflictBackoff``) and reads afresh. Every participant's keep-alive rewrites the whole blob,
which is why etcd's history grows as N^2 per keep-alive interval. Events are named without
``inspect.stack()``, as the old handler did. The round's c10d store here is a ``TCPStore`` in the
bench process (the old design's ``EtcdStore`` wrote two more keys per round); what is compared
is the membership. Nothing here is imported by the package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.events import NodeState, construct_and_record_rdzv_event
from torch.distributed.elastic.rendezvous.api import RendezvousHandler
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    RendezvousBackend,
    RendezvousTimeout,
    Token,
    _DistributedRendezvousOpExecutor,
)

from elastic.rendezvous.config import EtcdConfig
from elastic.rendezvous.errors import EtcdLeaseNotFoundError, EtcdStateError
from elastic.rendezvous.etcd_client import connect
from elastic.rendezvous.kv import KeyValue, KeyValueClient, Put

STATE_TTL_SECONDS = 7200


class _LeaseKeeper:
    """A lease granted lazily, refreshed on use after TTL/3, re-granted when etcd forgot it."""

    def __init__(self, kv: KeyValueClient, *, ttl_seconds: int) -> None:
        self._kv, self._ttl_seconds = kv, ttl_seconds
        self._lock = threading.Lock()
        self._lease_id: int | None = None
        self._refreshed_at = 0.0

    def lease_id(self) -> int:
        with self._lock:
            now = time.monotonic()
            if self._lease_id is not None and now - self._refreshed_at > self._ttl_seconds / 3:
                if self._kv.refresh_lease(self._lease_id) <= 0:
                    self._lease_id = None
                self._refreshed_at = now
            if self._lease_id is None:
                self._lease_id = self._kv.grant_lease(self._ttl_seconds)
                self._refreshed_at = now
            return self._lease_id

    def write(self, fn: Callable[[int], Any]) -> Any:
        lease_id = self.lease_id()
        try:
            return fn(lease_id)
        except EtcdLeaseNotFoundError:
            with self._lock:
                if self._lease_id == lease_id:
                    self._lease_id = None
            return fn(self.lease_id())


@dataclass
class _ConflictBackoff:
    """Random wait after the n-th lost compare-and-set in a row: uniform in [0, base * 2^(n-1)]."""

    base_seconds: float = 0.002
    cap_seconds: float = 1.0
    consecutive_losses: int = field(default=0, init=False)

    def lost(self) -> None:
        self.consecutive_losses += 1
        window = min(self.cap_seconds, self.base_seconds * 2 ** (self.consecutive_losses - 1))
        time.sleep(random.uniform(0.0, window))

    def won(self) -> None:
        self.consecutive_losses = 0


class LegacyBackend(RendezvousBackend):
    """torch's ``RendezvousBackend`` on one etcd key, fenced by its mod_revision."""

    def __init__(self, kv: KeyValueClient, *, key: str, lease: _LeaseKeeper) -> None:
        self._kv, self._key, self._lease = kv, key, lease
        self._backoff = _ConflictBackoff()

    @property
    def name(self) -> str:
        return "etcd3-legacy"

    def get_state(self) -> tuple[bytes, Token] | None:
        return _decode(self._kv.get(self._key))

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        expected = _expected_revision(token)
        if expected is None:
            current = self.get_state()
            return None if current is None else (*current, False)
        result = self._lease.write(
            lambda lease_id: self._kv.commit(
                self._key, expected_mod_revision=expected, ops=[Put(self._key, state, lease_id)]
            )
        )
        if result.succeeded:
            self._backoff.won()
            current = _decode(result.current)
        else:
            self._backoff.lost()
            current = self.get_state()
        return None if current is None else (current[0], current[1], bool(result.succeeded))


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


def _decode(kv: KeyValue | None) -> tuple[bytes, Token] | None:
    if kv is None:
        return None
    if not kv.value:
        raise EtcdStateError(f"rendezvous state at {kv.key} is empty")
    return kv.value, kv.mod_revision


def _caller_method() -> str:
    return sys._getframe(2).f_code.co_name


class _Executor(_DistributedRendezvousOpExecutor):
    """torch's executor, recording its events without ``inspect.stack()``."""

    def _record(self, message: str, node_state: NodeState = NodeState.RUNNING) -> None:
        construct_and_record_rdzv_event(
            name=f"{type(self).__name__}.{_caller_method()}",
            run_id=self._settings.run_id,
            message=message,
            node_state=node_state,
            hostname=self._node.addr,
            pid=self._node.pid,
            local_id=self._node.local_id,
        )


class LegacyHandler(DynamicRendezvousHandler):
    """torch's handler, recording its events without ``inspect.stack()``."""

    def _record(
        self, message: str, node_state: NodeState = NodeState.RUNNING, rank: int | None = None
    ) -> None:
        construct_and_record_rdzv_event(
            name=f"{type(self).__name__}.{_caller_method()}",
            run_id=self._settings.run_id,
            message=message,
            node_state=node_state,
            hostname=self._this_node.addr,
            pid=self._this_node.pid,
            local_id=self._this_node.local_id,
            rank=rank,
        )


def create_handler(
    kv: KeyValueClient,
    store: dist.Store,
    *,
    run_id: str,
    num_nodes: int,
    keep_alive_seconds: float,
    keep_alive_max_attempt: int,
) -> LegacyHandler:
    """min = max = ``num_nodes``, last call 1 s, on the state key of ``run_id``."""
    lease = _LeaseKeeper(kv, ttl_seconds=STATE_TTL_SECONDS)
    backend = LegacyBackend(kv, key=f"/elasticd/{run_id}/rdzv/state", lease=lease)
    timeout = RendezvousTimeout(
        join=timedelta(seconds=300),
        last_call=timedelta(seconds=1),
        close=timedelta(seconds=30),
        heartbeat=timedelta(seconds=10),
    )
    handler = LegacyHandler.from_backend(
        run_id,
        store,
        backend,
        num_nodes,
        num_nodes,
        "127.0.0.1",
        timeout,
        keep_alive_interval=keep_alive_seconds,  # type: ignore[arg-type]  # seconds
        keep_alive_max_attempt=keep_alive_max_attempt,
    )
    assert isinstance(handler, LegacyHandler)
    handler._op_executor = _Executor(handler._this_node, handler._state_holder, handler._settings)
    return handler


def form_round(handlers: Sequence[RendezvousHandler], *, bound_seconds: float = 600) -> float:
    """Seconds until every handler's ``next_rendezvous()`` returned (threads, started together)."""
    errors: list[BaseException] = []

    def join(handler: RendezvousHandler) -> None:
        try:
            handler.next_rendezvous()
        except BaseException as exc:  # reported below; the bench must not hang on it
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(h,), daemon=True) for h in handlers]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, started + bound_seconds - time.monotonic()))
    elapsed = time.monotonic() - started
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"round did not complete: {errors[:3]}")
    return elapsed


@contextlib.contextmanager
def legacy_group(
    endpoint: str, num_nodes: int, *, keep_alive_seconds: float, keep_alive_max_attempt: int = 3
) -> Iterator[list[RendezvousHandler]]:
    """``num_nodes`` handlers of one new run, each on its own etcd client; shut down after."""
    config = EtcdConfig(
        endpoints=(endpoint,), connect_timeout_seconds=30.0, request_timeout_seconds=30.0
    )
    run_id = f"legacy-{uuid.uuid4().hex[:8]}"
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True)
    clients = [connect(config) for _ in range(num_nodes)]
    handlers: list[RendezvousHandler] = [
        create_handler(
            client,
            dist.TCPStore("127.0.0.1", server.port, is_master=False),
            run_id=run_id,
            num_nodes=num_nodes,
            keep_alive_seconds=keep_alive_seconds,
            keep_alive_max_attempt=keep_alive_max_attempt,
        )
        for client in clients
    ]
    try:
        yield handlers
    finally:
        for handler in handlers:
            handler.shutdown()
        for client in clients:
            client.close()


def etcd_status(endpoint: str) -> tuple[int, int]:
    """(revision, database bytes) from ``etcdctl endpoint status``."""
    from tests.support.etcd import etcd_binary

    etcdctl = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
    out = subprocess.run(
        [etcdctl, f"--endpoints={endpoint}", "endpoint", "status", "-w", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    status = json.loads(out)[0]["Status"]
    return int(status["header"]["revision"]), int(status["dbSize"])


def round_seconds(endpoint: str, num_nodes: int) -> dict[str, float]:
    """One round of ``num_nodes`` (keep-alive 5 s, torch's default) and its etcd revisions."""
    with legacy_group(endpoint, num_nodes, keep_alive_seconds=5.0, keep_alive_max_attempt=6) as hs:
        rev0, _ = etcd_status(endpoint)
        seconds = form_round(hs)
        rev1, _ = etcd_status(endpoint)
    return {"seconds": seconds, "writes": rev1 - rev0}


def idle_growth(
    endpoint: str, num_nodes: int, keep_alive_seconds: float, window_seconds: float
) -> dict[str, float]:
    """After one round: revisions/s and database bytes/s over ``window_seconds`` of keep-alives."""
    with legacy_group(endpoint, num_nodes, keep_alive_seconds=keep_alive_seconds) as handlers:
        form_round(handlers)
        time.sleep(2 * keep_alive_seconds)  # steady state: every participant has beaten
        rev0, db0 = etcd_status(endpoint)
        started = time.monotonic()
        time.sleep(window_seconds)  # the measured window itself
        rev1, db1 = etcd_status(endpoint)
        elapsed = time.monotonic() - started
    return {
        "writes_per_second": (rev1 - rev0) / elapsed,
        "db_bytes_per_second": (db1 - db0) / elapsed,
        "window_seconds": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("round", "idle"))
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--keep-alive", type=float, default=1.0, help="seconds (idle)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds (idle)")
    args = parser.parse_args(argv)
    if args.what == "round":
        result = round_seconds(args.endpoint, args.nodes)
    else:
        result = idle_growth(args.endpoint, args.nodes, args.keep_alive, args.window)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
