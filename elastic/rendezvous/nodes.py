"""Node liveness for the daemon: ``NodeLease`` (announce myself) and ``NodeWatch`` (see others).

``NodeLease.register(node_id, info)`` writes ``<prefix>/<run_id>/nodes/<node_id>`` (JSON) under a
lease of ``ttl_seconds`` that a background thread refreshes every TTL/3. ``revoke()`` on a
graceful exit deletes the key at once; a killed process's key vanishes when the lease expires.
When etcd forgot the lease (an outage longer than the TTL), the thread re-creates lease and key
and reports it through ``on_expired`` and ``expired_count``: the rest of the group may already
have treated this node as gone. The key is only ever created where none exists (one
transaction): while another live lease holds the id, ``register`` raises ``NodeIdTaken``.

``NodeWatch`` turns that prefix into ``NodeEvent("joined" | "left", node_id, info)`` delivered to
a callback or a queue, keeps ``list_nodes()`` current, and after an etcd outage re-lists and
reports the difference, so no arrival or departure is lost.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

from elastic import jsonlog
from elastic.rendezvous.errors import EtcdRendezvousError, EtcdStateError, NodeIdTaken
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValue, KeyValueClient, Put, WatchEvent
from elastic.rendezvous.records import decode_node, encode_node
from elastic.rendezvous.watching import PrefixWatch

log = jsonlog.get("elastic.rendezvous.nodes")

DEFAULT_KEY_PREFIX = "/elasticd"


def _encode(info: Mapping[str, Any]) -> bytes:
    return encode_node(info)


def _decode(key: str, value: bytes) -> dict[str, Any]:
    return decode_node(key, value)


class NodeLease:
    """This node's presence in the run: a key under a lease that a thread keeps alive."""

    def __init__(
        self,
        kv: KeyValueClient,
        *,
        run_id: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl_seconds: float = 10.0,
        on_expired: Callable[[], None] | None = None,
        on_health: Callable[[bool], None] | None = None,
        retry_seconds: float = 0.5,
    ) -> None:
        self._kv = kv
        self._keys = RunKeys(key_prefix, run_id)
        self._ttl = max(1, math.ceil(ttl_seconds))
        self._on_expired = on_expired
        self._on_health = on_health or (lambda up: None)
        self._retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._node_id: str | None = None
        self._info: dict[str, Any] = {}
        self._lease_id: int | None = None
        self.expired_count = 0  # times etcd had dropped the lease and it was re-created
        self.taken = False  # the lease expired and another daemon registered this id

    @property
    def node_id(self) -> str | None:
        return self._node_id

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    @property
    def key(self) -> str:
        if self._node_id is None:
            raise RuntimeError("NodeLease.key before register()")
        return self._keys.node(self._node_id)

    def register(self, node_id: str, info: Mapping[str, Any]) -> None:
        """Create lease and key now (errors propagate), then keep them alive in background."""
        if self._thread is not None:
            raise RuntimeError(f"NodeLease already registered as {self._node_id}")
        self._keys.node(node_id)  # validates the id
        self._node_id, self._info = node_id, dict(info)
        self._assert()
        self._thread = threading.Thread(
            target=self._keep_alive, name=f"node-lease-{node_id}", daemon=True
        )
        self._thread.start()

    def update(self, info: Mapping[str, Any]) -> None:
        """Replace the published info (same lease)."""
        with self._lock:
            self._info = dict(info)
            lease_id = self._lease_id
        if lease_id is None:
            return  # revoked (left): a key without a lease would outlive this node
        self._kv.put(self.key, _encode(self._info), lease_id=lease_id)

    def _assert(self) -> None:
        """A new lease and the key under it, only if no live lease holds the key (one
        transaction): a second daemon with this id is refused, not allowed to overwrite."""
        lease_id = self._kv.grant_lease(self._ttl)
        with self._lock:
            value = _encode(self._info)
        result = self._kv.commit(
            self.key, expected_mod_revision=0, ops=[Put(self.key, value, lease_id=lease_id)]
        )
        if not result.succeeded:
            self._kv.revoke_lease(lease_id)
            holder = result.current
            raise NodeIdTaken(
                self._node_id or "?", _decode(self.key, holder.value) if holder else {}
            )
        with self._lock:
            self._lease_id = lease_id

    def _keep_alive(self) -> None:
        needs_assert = False
        interval = self._ttl / 3
        while not self._stop.wait(interval):
            try:
                if not needs_assert and self._kv.refresh_lease(self._lease_id or 0) > 0:
                    interval = self._ttl / 3
                    self._on_health(True)
                    continue
                if not needs_assert:
                    needs_assert = True
                    self.expired_count += 1
                    log.warning("node_lease_expired", node=self._node_id, key=self.key)
                if self._stop.is_set():
                    return
                try:
                    self._assert()
                except NodeIdTaken as exc:
                    # Our lease expired and another daemon took the id meanwhile: it is the
                    # node now; this one must not fight over the key.
                    log.error("node_id_taken", node=self._node_id, error=str(exc))
                    self.taken = True
                    self._notify_expired()
                    return
                needs_assert = False
                interval = self._ttl / 3
                self._on_health(True)
                self._notify_expired()
            # etcd unreachable: retry soon; the lease may still be alive on the server.
            except EtcdRendezvousError as exc:
                log.warning("node_lease_keepalive_failed", node=self._node_id, error=str(exc))
                self._on_health(False)
                interval = min(self._retry_seconds, self._ttl / 3)

    def _notify_expired(self) -> None:
        if self._on_expired is None:
            return
        try:
            self._on_expired()
        # The owner's callback failing must not stop the keep-alive of a live lease.
        except Exception:
            log.exception("node_lease_callback_failed", node=self._node_id)

    def revoke(self) -> None:
        """Graceful exit: stop the keep-alive and revoke the lease (the key goes at once)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)
        with self._lock:
            lease_id, self._lease_id = self._lease_id, None
        if lease_id is not None:
            self._kv.revoke_lease(lease_id)


@dataclasses.dataclass(frozen=True)
class NodeEvent:
    kind: Literal["joined", "left"]
    node_id: str
    info: dict[str, Any]


class NodeWatch:
    """Arrivals and departures under ``<prefix>/<run_id>/nodes/``; see the module docstring."""

    def __init__(
        self,
        kv: KeyValueClient,
        *,
        run_id: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        on_event: Callable[[NodeEvent], None] | None = None,
        retry_seconds: float = 0.5,
    ) -> None:
        self._keys = RunKeys(key_prefix, run_id)
        self._on_event = on_event
        self._queue: queue.Queue[NodeEvent] = queue.Queue()
        self._lock = threading.Lock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self._primed = False  # the first snapshot is the baseline, not news
        self._watch = PrefixWatch(
            kv,
            self._keys.nodes,
            on_snapshot=self._snapshot,
            on_events=self._events,
            retry_seconds=retry_seconds,
        )

    def start(self) -> NodeWatch:
        """Read the current nodes (no events for them) and start watching."""
        self._watch.start()
        return self

    def list_nodes(self) -> dict[str, dict[str, Any]]:
        """Nodes present now, as this watch knows them: ``{node_id: info}``."""
        with self._lock:
            return {node_id: dict(info) for node_id, info in self._nodes.items()}

    def get(self, timeout_seconds: float) -> NodeEvent | None:
        """Next event from the queue (only when no ``on_event`` callback was given)."""
        try:
            return self._queue.get(timeout=timeout_seconds)
        except queue.Empty:
            return None

    @property
    def resyncs(self) -> int:
        return self._watch.resyncs

    def close(self) -> None:
        self._watch.close()

    def _node_id(self, key: str) -> str:
        return key[len(self._keys.nodes) :]

    def _snapshot(self, kvs: list[KeyValue]) -> None:
        now: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            try:
                now[self._node_id(kv.key)] = _decode(kv.key, kv.value)
            except EtcdStateError as exc:  # one bad key must not blind us to the others
                log.warning("node_key_corrupt", key=kv.key, error=str(exc))
        with self._lock:
            before, self._nodes = self._nodes, now
            first, self._primed = not self._primed, True
        if first:
            return
        for node_id in sorted(before.keys() - now.keys()):
            self._emit(NodeEvent("left", node_id, before[node_id]))
        for node_id in sorted(now.keys() - before.keys()):
            self._emit(NodeEvent("joined", node_id, now[node_id]))

    def _events(self, events: list[WatchEvent]) -> None:
        for event in events:
            node_id = self._node_id(event.key)
            if event.kind == "delete":
                with self._lock:
                    info = self._nodes.pop(node_id, None)
                if info is not None:
                    self._emit(NodeEvent("left", node_id, info))
                continue
            try:
                info = _decode(event.key, event.value)
            except EtcdStateError as exc:
                log.warning("node_key_corrupt", key=event.key, error=str(exc))
                continue
            with self._lock:
                known = node_id in self._nodes
                self._nodes[node_id] = info
            if not known:
                self._emit(NodeEvent("joined", node_id, info))

    def _emit(self, event: NodeEvent) -> None:
        if self._on_event is None:
            self._queue.put(event)
            return
        try:
            self._on_event(event)
        # A failing consumer callback must not kill the watch thread for every later event.
        except Exception:
            log.exception("node_event_callback_failed", node=event.node_id, kind=event.kind)
