"""One process of simulated participants for bench/membership.py (threads inside, one etcd client
each).

A participant is what a daemon brings to the round protocol: its own etcd connection
(``_TimedClient``, an ``EtcdClient`` that notes when its join put and its closing
compare-and-set happened), a lease with its node record (``records.encode_node``, state
``active``), a ``GroupView`` and a ``RoundJoiner`` whose expected set is the live nodes with state
``active``. Leases are kept alive by a few threads per process (``_KeepAlive``) rather than one
per participant, through each participant's own client; a participant's keep-alives can be
stopped to let its lease expire.

The coordinator drives a process through a pipe, one command at a time (``serve``); times are
``time.monotonic()`` values, which are system-wide on Linux and so comparable across processes.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from elastic.rendezvous import etcd_client
from elastic.rendezvous.config import EtcdConfig
from elastic.rendezvous.errors import EtcdRendezvousError
from elastic.rendezvous.etcd_client import EtcdClient
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import Op, TxnResult
from elastic.rendezvous.records import RoundRecord, decode_round, encode_node
from elastic.rendezvous.rounds import JoinSettings, RoundJoiner
from elastic.rendezvous.view import GroupView, Snapshot

KEEP_ALIVE_THREADS = 8
OWN_THREAD_TTL_SECONDS = 6
THREAD_STACK_BYTES = 512 * 1024  # thousands of threads per process: keep their stacks small


class _TimedClient(EtcdClient):
    """An ``EtcdClient`` noting its join put (start, end) and a successful closing CAS (start, end).

    Only the CAS's start is causally before every watcher's receipt of the closed round: its
    end is noted when this thread next runs, which on a busy machine can be after the watchers.
    """

    def __init__(self, config: EtcdConfig, keys: RunKeys) -> None:
        super().__init__(config)
        self._joins_root = keys.joins_root
        self.join_put: tuple[float, float] | None = None
        self.closed_at: float | None = None
        self.close_sent_at: float | None = None

    def put(self, key: str, value: bytes, *, lease_id: int | None = None) -> int:
        started = time.monotonic()
        revision = super().put(key, value, lease_id=lease_id)
        if key.startswith(self._joins_root):
            self.join_put = (started, time.monotonic())
        return revision

    def commit(self, key: str, *, expected_mod_revision: int, ops: Sequence[Op]) -> TxnResult:
        started = time.monotonic()
        result = super().commit(key, expected_mod_revision=expected_mod_revision, ops=ops)
        current = result.current
        if result.succeeded and current and decode_round(key, current.value).closed:
            self.close_sent_at, self.closed_at = started, time.monotonic()
        return result


@dataclasses.dataclass
class Participant:
    name: str
    kv: _TimedClient
    lease_id: int
    ttl_seconds: int
    view: GroupView | None = None
    joiner: RoundJoiner | None = None
    keep_alive: bool = True
    next_refresh: float = 0.0
    last_refresh_sent: float = 0.0
    removed_at: dict[str, float] = dataclasses.field(default_factory=dict)
    last_round: RoundRecord | None = None
    lease_expired: bool = False  # a keep-alive came too late: this run's figures are void

    def on_change(self, old: Snapshot, new: Snapshot) -> None:
        now = time.monotonic()
        for node in old.nodes.keys() - new.nodes.keys():
            self.removed_at.setdefault(node, now)


def _expected(snapshot: Snapshot) -> set[str]:
    return {name for name, info in snapshot.nodes.items() if info.get("state") == "active"}


class _KeepAlive:
    """A few threads refreshing every participant's lease each TTL/3, via its own client; a
    lease shorter than ``OWN_THREAD_TTL_SECONDS`` gets a thread of its own (a shared thread's
    pass over hundreds of leases may take longer than a third of it on a loaded machine)."""

    def __init__(self, participants: Sequence[Participant]) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.max_gap_seconds = 0.0  # longest time between two refreshes of one lease
        self.failures = 0
        short = [[p] for p in participants if p.ttl_seconds < OWN_THREAD_TTL_SECONDS]
        rest = [p for p in participants if p.ttl_seconds >= OWN_THREAD_TTL_SECONDS]
        groups = short + [rest[i::KEEP_ALIVE_THREADS] for i in range(KEEP_ALIVE_THREADS)]
        self._threads = [threading.Thread(target=self._loop, args=(g,)) for g in groups if g]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def _loop(self, mine: Sequence[Participant]) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for p in mine:
                if p.keep_alive and p.next_refresh <= now:
                    try:
                        self._refresh(p)
                    # A failed keep-alive is retried next pass; an expiry marks the run void.
                    except EtcdRendezvousError:
                        self.failures += 1
            due = min((p.next_refresh for p in mine if p.keep_alive), default=now + 1.0)
            self._stop.wait(max(0.01, due - time.monotonic()))

    def _refresh(self, p: Participant) -> None:
        with self._lock:
            if not p.keep_alive:
                return
            now = time.monotonic()
            if p.last_refresh_sent:
                self.max_gap_seconds = max(self.max_gap_seconds, now - p.last_refresh_sent)
            p.last_refresh_sent = now
        if p.kv.refresh_lease(p.lease_id) <= 0:
            p.lease_expired = True
        p.next_refresh = p.last_refresh_sent + p.ttl_seconds / 3

    def stop_one(self, p: Participant) -> float:
        """Stop ``p``'s keep-alives; the monotonic time its last refresh was sent."""
        with self._lock:
            p.keep_alive = False
            return p.last_refresh_sent

    def close(self) -> None:
        self._stop.set()


class Worker:
    """The participants of one process and the commands the coordinator sends them."""

    def __init__(self, endpoint: str, keys: RunKeys) -> None:
        self._config = EtcdConfig(
            endpoints=(endpoint,), connect_timeout_seconds=60.0, request_timeout_seconds=60.0
        )
        self._keys = keys
        self._participants: dict[str, Participant] = {}
        self._keep_alive: _KeepAlive | None = None
        self._armed: _KeepAlive | None = None
        self._armed_participant: Participant | None = None

    def register(self, names: Sequence[str], ttl_seconds: dict[str, int]) -> None:
        """Connect, grant a lease and put the node record of every participant."""
        for name in names:
            kv = _TimedClient(self._config, self._keys)
            kv.status()
            ttl = ttl_seconds[name]
            lease_id = kv.grant_lease(ttl)
            kv.put(self._keys.node(name), encode_node({"state": "active"}), lease_id=lease_id)
            self._participants[name] = Participant(name, kv, lease_id, ttl, next_refresh=0.0)
        self._keep_alive = _KeepAlive(list(self._participants.values()))

    def start_views(self) -> None:
        for p in self._participants.values():
            p.view = GroupView(p.kv, self._keys).start()
            p.view.subscribe(p.on_change)
            lease_id = p.lease_id
            p.joiner = RoundJoiner(
                p.kv,
                self._keys,
                p.view,
                name=p.name,
                addr="127.0.0.1",
                lease_id=lambda lease_id=lease_id: lease_id,  # type: ignore[misc]
                port=lambda: 29500,
                expected=_expected,
            )

    def join(
        self, settings: JoinSettings, *, after_round: int, start_at: float
    ) -> list[dict[str, Any]]:
        """Every participant calls ``join()`` at ``start_at``; one result dict each."""
        results: dict[str, dict[str, Any]] = {}
        threads = [
            threading.Thread(target=self._join_one, args=(p, settings, after_round, results))
            for p in self._participants.values()
        ]
        for p in self._participants.values():
            p.kv.join_put, p.kv.closed_at, p.kv.close_sent_at = None, None, None
        time.sleep(max(0.0, start_at - time.monotonic()))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return list(results.values())

    def _join_one(
        self,
        p: Participant,
        settings: JoinSettings,
        after_round: int,
        results: dict[str, dict[str, Any]],
    ) -> None:
        assert p.joiner is not None
        error = ""
        record = None
        try:
            record = p.joiner.join(settings, after_round=after_round)
        except Exception as exc:  # reported to the coordinator, which fails the measurement
            error = f"{type(exc).__name__}: {exc}"
        returned = time.monotonic()
        if record is not None:
            p.joiner.remember(record)
            p.last_round = record
        put = p.kv.join_put
        results[p.name] = {
            "name": p.name,
            "returned": returned,
            "put_started": put[0] if put else None,
            "put_done": put[1] if put else None,
            "closed_at": p.kv.closed_at,
            "round": record.round if record else None,
            "participants": len(record.participants) if record else 0,
            "error": error,
            "lease_expired": p.lease_expired,
        }

    def keep_alive_gap(self) -> float:
        """The longest time between two keep-alives of one lease (TTL/3 when on time)."""
        return self._keep_alive.max_gap_seconds if self._keep_alive else 0.0

    def arm_loss(self, name: str, ttl_seconds: int) -> None:
        """Move ``name``'s node record to a new lease of ``ttl_seconds``, kept alive by a thread
        of its own (short leases are armed only now: under the rounds' CPU load on this machine
        a 3 s lease can miss its keep-alive)."""
        p = self._participants[name]
        lease_id = p.kv.grant_lease(ttl_seconds)
        p.kv.put(self._keys.node(name), encode_node({"state": "active"}), lease_id=lease_id)
        armed = Participant(name, p.kv, lease_id, ttl_seconds)
        self._armed = _KeepAlive([armed])
        self._armed_participant = armed

    def stop_keep_alive(self) -> float:
        """Stop the armed lease's keep-alives; when its last one was sent."""
        assert self._armed is not None and self._armed_participant is not None
        return self._armed.stop_one(self._armed_participant)

    def removal_times(self, node: str, timeout_seconds: float) -> list[float | None]:
        """When each other participant's view dropped ``node`` (None: not within the timeout)."""
        deadline = time.monotonic() + timeout_seconds
        others = [p for p in self._participants.values() if p.name != node]
        while time.monotonic() < deadline and any(node not in p.removed_at for p in others):
            time.sleep(0.05)
        return [p.removed_at.get(node) for p in others]

    def close(self) -> None:
        if self._armed is not None:
            self._armed.close()
        if self._keep_alive is not None:
            self._keep_alive.close()
        for p in self._participants.values():
            if p.view is not None:
                p.view.close()
        # Revoked now, so that the next size's rounds and idle window see no expiries of these.
        for p in self._participants.values():
            p.kv.revoke_lease(p.lease_id)
            p.kv.close()


def serve(conn: Connection, endpoint: str, keys: RunKeys) -> None:
    """The process's main: run the coordinator's commands until ``close``."""
    # One TCP connection per participant, as separate nodes have: gRPC otherwise shares one
    # connection among the channels of a process that dial the same target.
    etcd_client._GRPC_OPTIONS = [*etcd_client._GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a stuck run: kill -USR1 <pid>
    threading.stack_size(THREAD_STACK_BYTES)
    worker = Worker(endpoint, keys)
    try:
        while True:
            command, kwargs = conn.recv()
            try:
                reply: Any = getattr(worker, command)(**kwargs)
            except Exception as exc:  # the coordinator reports it and stops the run
                conn.send(("error", f"{command}: {type(exc).__name__}: {exc}"))
                continue
            conn.send(("ok", reply))
            if command == "close":
                return
    finally:
        worker.close()
