"""``PrefixWatch``: list a key prefix, watch it from the next revision, survive etcd outages.

After any break (etcd restart, failover, compaction) it lists the prefix again and watches from
that list's revision + 1, so the consumer sees a fresh snapshot followed by every later change,
never a gap. Consumers diff snapshots against what they knew (see ``nodes.NodeWatch``).
Snapshot and event callbacks are serialised; callbacks of a superseded watch are dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from elastic import jsonlog
from elastic.rendezvous.errors import EtcdRendezvousError
from elastic.rendezvous.kv import KeyValue, KeyValueClient, WatchEvent, WatchHandle

log = jsonlog.get("elastic.rendezvous.watch")

SnapshotCallback = Callable[[list[KeyValue]], None]
EventsCallback = Callable[[list[WatchEvent]], None]


class PrefixWatch:
    """Snapshot + change stream of one prefix, re-established after every break."""

    def __init__(
        self,
        kv: KeyValueClient,
        prefix: str,
        *,
        on_snapshot: SnapshotCallback,
        on_events: EventsCallback,
        retry_seconds: float = 0.5,
    ) -> None:
        self._kv = kv
        self._prefix = prefix
        self._on_snapshot = on_snapshot
        self._on_events = on_events
        self._retry_seconds = retry_seconds
        self._deliver_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._generation = 0
        self._handle: WatchHandle | None = None
        self._broken = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.resyncs = 0  # how many times the watch was re-established (for tests and logs)

    def start(self) -> PrefixWatch:
        """First snapshot in the caller's thread (errors propagate), then watch in background."""
        self._resync()
        self._thread = threading.Thread(
            target=self._supervise, name=f"prefix-watch{self._prefix}", daemon=True
        )
        self._thread.start()
        return self

    def _resync(self) -> None:
        kvs, revision = self._kv.get_prefix(self._prefix)
        with self._state_lock:
            self._generation += 1
            generation = self._generation
        with self._deliver_lock:
            self._on_snapshot(kvs)
        handle = self._kv.watch_prefix(
            self._prefix,
            start_revision=revision + 1,
            on_events=lambda events: self._deliver(generation, events),
            on_error=lambda exc: self._break(generation, exc),
        )
        with self._state_lock:
            old, self._handle = self._handle, handle
            stale = self._closed.is_set()
        if old is not None:
            old.cancel()
        if stale:
            handle.cancel()

    def _deliver(self, generation: int, events: list[WatchEvent]) -> None:
        with self._deliver_lock:
            if generation == self._generation and not self._closed.is_set():
                self._on_events(events)

    def _break(self, generation: int, exc: Exception) -> None:
        if generation == self._generation and not self._closed.is_set():
            log.info("watch_broken", prefix=self._prefix, error=str(exc))
            self._broken.set()

    def _supervise(self) -> None:
        while not self._closed.is_set():
            self._broken.wait()
            if self._closed.is_set():
                return
            self._broken.clear()
            while not self._closed.is_set():
                try:
                    self._resync()
                    self.resyncs += 1
                    break
                # Any failure here is retried: the loop only ends when the watch is closed.
                except EtcdRendezvousError as exc:
                    log.info("watch_resync_failed", prefix=self._prefix, error=str(exc))
                    self._closed.wait(self._retry_seconds)

    def close(self) -> None:
        self._closed.set()
        self._broken.set()
        with self._state_lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
