"""``EtcdRendezvousHandler``: torch elastic's ``RendezvousHandler`` on the group's round protocol.

torchrun's agent (``--rdzv-backend etcd3``) talks to this class only through torch's interface;
underneath, a node is the same thing it is for the daemon (``rounds`` module docstring):

- a node record ``group/nodes/<name>`` = ``{"state": "active", "addr": ...}`` under its own lease
  (``NodeLease``; a killed agent disappears one TTL later, a shut-down one at once);
- one ``GroupView`` (a prefix watch on ``group/``) that every decision reads;
- a ``RoundJoiner``: ``next_rendezvous()`` is one ``join(after_round=<my last round>)``. The
  closed round record gives the rank (``participants`` are in rank order), the world size and
  the bootstrap address (``master_addr``/``master_port``: where the rank-0 node said, in its
  join record, that its workers' TCPStore would listen). Rounds after the first close as soon
  as every live active node has joined; the last call only waits for nodes that are not coming.

``name`` is ``<addr>_<pid>_<n>`` (characters outside ``[A-Za-z0-9_.-]`` become ``-``): unique per
handler of a process, so ranks follow from sorted names. ``num_nodes_waiting()`` reads the view
(no etcd request, however often the agent polls it): 1 when the group's latest round is newer
than this handler's and is open or formed without it, so the agent re-rendezvous.

The round's ``store`` is an ``EtcdStore`` under ``store/<round>/``, used by the agent for worker
rank assignment and its exit barrier; ``use_agent_store`` is False, so workers bootstrap from
``MASTER_ADDR``/``MASTER_PORT`` as with torch's own backends. Store keys and the run's closed
marker hang on a ``LeaseKeeper`` lease of ``state_ttl_seconds``: an abandoned run's keys expire.

Closing (torch's contract): ``set_closed()`` writes ``<root>closed``; ``shutdown()`` closes the
run too (as torch's ``DynamicRendezvousHandler``: an agent whose workers finished or failed for
good ends the run for everyone, and torchrun skips ``shutdown()`` when the agent dies by a
signal), then withdraws, revokes the node lease and stops its watches. ``leave()`` does the
latter without closing the run. Every handler watches the marker (a second, one-key watch: it is
not under ``group/``), so a node waiting in ``next_rendezvous`` gets ``RendezvousClosedError``
as soon as another node closes the run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import Callable

from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
)

from elastic import jsonlog
from elastic.rendezvous.config import EtcdConfig
from elastic.rendezvous.errors import EtcdRendezvousError
from elastic.rendezvous.etcd_client import connect
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValue, KeyValueClient, WatchEvent
from elastic.rendezvous.leases import LeaseKeeper
from elastic.rendezvous.nodes import NodeLease
from elastic.rendezvous.records import NAME_MAX_CHARS, encode
from elastic.rendezvous.rounds import JoinSettings, RoundJoiner
from elastic.rendezvous.store import EtcdStore
from elastic.rendezvous.torch_errors import torch_errors
from elastic.rendezvous.view import GroupView, Snapshot
from elastic.rendezvous.watching import PrefixWatch

log = jsonlog.get("elastic.rendezvous.handler")

BACKEND_NAME = "etcd3"
ACTIVE = "active"
CLOSED_KEY = "closed"  # under the run's root: <key_prefix>/<run_id>/closed
_ADDR_MAX_CHARS = NAME_MAX_CHARS - 40  # room for _<pid>_<n>
_NOT_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_local_ids = itertools.count()


def node_name_for(addr: str, pid: int | None = None) -> str:
    """``<addr>_<pid>_<n>``, a valid node name unique per handler of this process."""
    safe_addr = _NOT_NAME_CHARS.sub("-", addr)[:_ADDR_MAX_CHARS] or "node"
    return f"{safe_addr}_{os.getpid() if pid is None else pid}_{next(_local_ids)}"


def free_port() -> int:
    """A TCP port that nothing listens on now, for this node's workers' TCPStore as rank 0.

    The kernel's choice for port 0 on every interface, as torch's own ``get_free_port``: it is
    only a proposal, the rank-0 worker binds it when the round starts.
    """
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def active_nodes(snapshot: Snapshot) -> set[str]:
    """The live nodes a round waits for before closing early (rounds after the first)."""
    return {name for name, info in snapshot.nodes.items() if info.get("state") == ACTIVE}


class ClosedMarker:
    """The run's closed marker, kept current by a watch; ``on_change`` after each change."""

    def __init__(self, kv: KeyValueClient, key: str, *, on_change: Callable[[], None]) -> None:
        self.key = key
        self._on_change = on_change
        self._closed = threading.Event()
        self._watch = PrefixWatch(kv, key, on_snapshot=self._snapshot, on_events=self._events)

    def start(self) -> ClosedMarker:
        self._watch.start()
        return self

    def close(self) -> None:
        self._watch.close()

    def is_set(self) -> bool:
        return self._closed.is_set()

    def set_locally(self) -> None:
        self._closed.set()
        self._on_change()

    def _snapshot(self, kvs: list[KeyValue]) -> None:
        self._apply(any(kv.key == self.key for kv in kvs))

    def _events(self, events: list[WatchEvent]) -> None:
        for event in events:
            if event.key == self.key:
                self._apply(event.kind == "put")

    def _apply(self, closed: bool) -> None:
        if closed:
            self._closed.set()
        else:
            self._closed.clear()
        self._on_change()


class EtcdRendezvousHandler(RendezvousHandler):
    """See the module docstring. Build it with :func:`create_handler`."""

    def __init__(
        self,
        kv: KeyValueClient,
        *,
        keys: RunKeys,
        settings: JoinSettings,
        addr: str,
        node_ttl_seconds: float,
        state_ttl_seconds: float,
        owns_client: bool,
        name: str | None = None,
    ) -> None:
        self._kv, self._keys, self._settings = kv, keys, settings
        self._owns_client = owns_client
        self._addr = addr
        self.name = name or node_name_for(addr)
        self._keys.node(self.name)  # validates the name
        self._node = NodeLease(
            kv, run_id=keys.run_id, key_prefix=keys.key_prefix, ttl_seconds=node_ttl_seconds
        )
        self._store_lease = LeaseKeeper(kv, ttl_seconds=max(1, round(state_ttl_seconds)))
        self._view = GroupView(kv, keys)
        self._closed = ClosedMarker(kv, keys.root + CLOSED_KEY, on_change=self._view.poke)
        self._joiner = RoundJoiner(
            kv,
            keys,
            self._view,
            name=self.name,
            addr=addr,
            lease_id=lambda: self._node.lease_id,
            port=free_port,
            expected=active_nodes,
        )
        self._round = 0
        self._released = False

    def start(self) -> EtcdRendezvousHandler:
        """Register the node record and start the watches (errors propagate, nothing leaks)."""
        try:
            self._node.register(self.name, {"state": ACTIVE, "addr": self._addr})
            self._view.start()
            self._closed.start()
        except BaseException:
            self._release()
            raise
        return self

    # ------------------------------------------------------------------ torch's interface
    def get_backend(self) -> str:
        return BACKEND_NAME

    @property
    def use_agent_store(self) -> bool:
        """Workers bootstrap from MASTER_ADDR/MASTER_PORT (rank 0's TCPStore), not our store."""
        return False

    def get_run_id(self) -> str:
        return self._keys.run_id

    def next_rendezvous(self) -> RendezvousInfo:
        with torch_errors():
            return self._next_rendezvous()

    def _next_rendezvous(self) -> RendezvousInfo:
        if self._closed.is_set() or self._released:
            raise RendezvousClosedError(f"rendezvous {self._keys.run_id} is closed")
        started = time.monotonic()
        record = self._joiner.join(
            self._settings, after_round=self._round, should_stop=self._closed.is_set
        )
        if record is None:
            raise RendezvousClosedError(f"rendezvous {self._keys.run_id} was closed meanwhile")
        rank = record.rank_of(self.name)
        assert rank is not None, "join() returns only rounds that list this node"
        self._round = record.round
        self._joiner.remember(record)
        log.info(
            "rdzv_round_joined",
            run_id=self._keys.run_id,
            node=self.name,
            round=record.round,
            rank=rank,
            world_size=len(record.participants),
            seconds=round(time.monotonic() - started, 3),
        )
        store = EtcdStore(self._kv, prefix=self._keys.store(record.round), lease=self._store_lease)
        bootstrap = RendezvousStoreInfo(record.master_addr, record.master_port)
        return RendezvousInfo(store, rank, len(record.participants), bootstrap)

    def num_nodes_waiting(self) -> int:
        """1 when a newer round is open or formed without this node, else 0 (reads the view)."""
        latest = self._view.snapshot.round
        if latest is None or latest.round <= self._round:
            return 0
        return 0 if latest.closed and self.name in latest.participants else 1

    def is_closed(self) -> bool:
        return self._closed.is_set()

    def set_closed(self) -> None:
        value = encode({"closed_by": self.name})
        key = self._closed.key
        with torch_errors():
            self._store_lease.write(lambda lease_id: self._kv.put(key, value, lease_id=lease_id))
        self._closed.set_locally()

    def shutdown(self) -> bool:
        """Close the run (torch's contract, module docstring), then :meth:`leave`."""
        if self._released:
            return True
        closed = self._attempt("rdzv_close_failed", self.set_closed)
        return self.leave() and closed

    # ------------------------------------------------------------------ ours
    def leave(self) -> bool:
        """Leave without closing the run: withdraw from an open round, revoke the node lease
        (the record goes at once, so the others' next round does not wait for this node), stop
        the watches and close an owned client. False if etcd could not be told."""
        if self._released:
            return True
        return self._release()

    @property
    def round(self) -> int:
        """The round the last ``next_rendezvous`` returned (0: none yet)."""
        return self._round

    @property
    def keys(self) -> RunKeys:
        return self._keys

    @property
    def view(self) -> GroupView:
        return self._view

    def _release(self) -> bool:
        self._released = True
        ok = self._attempt("rdzv_withdraw_failed", self._joiner.withdraw)
        ok = self._attempt("rdzv_node_revoke_failed", self._node.revoke) and ok
        self._closed.close()
        self._view.close()
        if self._owns_client:
            self._kv.close()
        return ok

    def _attempt(self, event: str, action: Callable[[], None]) -> bool:
        try:
            action()
        # Shutdown goes on without etcd: the lease expires and a new round forms without us.
        except EtcdRendezvousError as exc:
            log.warning(event, run_id=self._keys.run_id, node=self.name, error=str(exc))
            return False
        return True


def create_handler(
    etcd: EtcdConfig | KeyValueClient,
    *,
    run_id: str,
    min_nodes: int,
    max_nodes: int,
    local_addr: str | None = None,
    key_prefix: str | None = None,
    join_timeout_seconds: float = 600.0,
    last_call_timeout_seconds: float = 30.0,
    ttl_seconds: float | None = None,
    state_ttl_seconds: float | None = None,
    node_name: str | None = None,
) -> EtcdRendezvousHandler:
    """A started rendezvous handler for ``run_id`` on etcd (its node record is written now).

    ``etcd`` is either an ``EtcdConfig`` (a client is connected now and closed by ``shutdown()``)
    or a shared ``KeyValueClient`` the caller keeps owning. ``key_prefix``, ``ttl_seconds`` (the
    node lease: a killed node is gone this long after its last keep-alive) and
    ``state_ttl_seconds`` (store keys and closed marker) default to the config's (a client from
    ``connect`` carries its config). ``local_addr`` is where other nodes reach this one (default:
    the FQDN); ``node_name`` defaults to ``<addr>_<pid>_<n>``. ``last_call_timeout_seconds``:
    how long a round with at least ``min_nodes`` waits for more (the first round always, later
    ones only while a live node has not joined).
    """
    if not 1 <= min_nodes <= max_nodes:
        raise ValueError(f"need 1 <= min_nodes <= max_nodes, got {min_nodes}, {max_nodes}")
    if join_timeout_seconds <= 0 or last_call_timeout_seconds < 0:
        raise ValueError(
            f"join_timeout_seconds {join_timeout_seconds} must be > 0 and "
            f"last_call_timeout_seconds {last_call_timeout_seconds} >= 0"
        )
    with torch_errors():
        return _create_handler(
            etcd,
            run_id=run_id,
            key_prefix=key_prefix,
            local_addr=local_addr,
            node_name=node_name,
            settings=JoinSettings(
                min_nodes=min_nodes,
                max_nodes=max_nodes,
                last_call_seconds=last_call_timeout_seconds,
                timeout_seconds=join_timeout_seconds,
            ),
            ttl_seconds=ttl_seconds,
            state_ttl_seconds=state_ttl_seconds,
        )


def _create_handler(
    etcd: EtcdConfig | KeyValueClient,
    *,
    run_id: str,
    key_prefix: str | None,
    local_addr: str | None,
    node_name: str | None,
    settings: JoinSettings,
    ttl_seconds: float | None,
    state_ttl_seconds: float | None,
) -> EtcdRendezvousHandler:
    kv: KeyValueClient
    if isinstance(etcd, EtcdConfig):
        config, kv, owns = etcd, connect(etcd), True
    else:
        config, kv, owns = getattr(etcd, "config", None) or EtcdConfig(), etcd, False
    try:
        handler = EtcdRendezvousHandler(
            kv,
            keys=RunKeys(key_prefix or config.key_prefix, run_id),
            settings=settings,
            addr=local_addr or socket.getfqdn(),
            node_ttl_seconds=ttl_seconds if ttl_seconds is not None else config.ttl_seconds,
            state_ttl_seconds=(
                state_ttl_seconds if state_ttl_seconds is not None else config.state_ttl_seconds
            ),
            owns_client=owns,
            name=node_name,
        )
    except BaseException:
        if owns:
            kv.close()
        raise
    return handler.start()  # releases (and closes an owned client) if it fails
