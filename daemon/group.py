"""This node's membership in the run's elastic group, over ``elastic.rendezvous``.

Everything the supervisor asks of etcd goes through :class:`Group`, and nothing here polls:

- one watch (``GroupView``) keeps an immutable :class:`~elastic.rendezvous.view.Snapshot` of
  ``group/``: the latest round record, control requests (scale, pause, rewind), round aborts
  and every live node's record (each under its node lease). The supervisor's questions per tick
  (``regroup_wanted``, ``peer_failed``, ``member_lost``, ``take_control``) read that snapshot
  and compare round ids: nothing is stale by a counter;
- ``join()``: one round of the protocol in ``elastic.rendezvous.rounds`` (open by
  compare-and-set, join with one put, the opener closes by compare-and-set) ->
  :class:`RoundAssignment`. A re-formed round closes as soon as every live node that is not
  leaving has joined; a newer round than ours (a newcomer, a restart elsewhere) is the signal
  to regroup at the next step boundary;
- liveness: the node lease (``NodeLease``; keep-alives write no revision). A member of our
  round whose record vanishes without a graceful state first (draining, stopped) is
  ``node_lost``, seen through the watch within the lease TTL;
- ``announce_failure()`` / ``peer_failed()``: a crash anywhere stops every node at once (the
  round's abort key), instead of waiting for a collective to time out;
- the node's record is published by one :class:`_Publisher`, only when it changes in a way
  others act on (state, identity, failure, the straggler value moving by more than
  ``COMPUTE_BAND``); rank 0 refreshes the run status on changes and at most every
  ``RUN_STATUS_SECONDS`` while steps advance. In steady state the daemon's only etcd traffic
  is its lease keep-alive (and that one O(1) status write on rank 0).

etcd outages: the snapshot keeps the last known answers and ``etcd_up`` follows the keep-alive;
nothing here stops running workers because etcd is unreachable. Fencing: a node that reaches
etcd again and finds its lease gone (``fenced()``) stops its workers at once, before they step
or commit in the old group, and rejoins through a new round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from daemon import identity
from daemon.config import DaemonConfig
from daemon.metrics import NodeMetrics
from daemon.ports import free_port
from daemon.stragglers import STATUS_KEY
from daemon.workers import RoundAssignment
from elastic import jsonlog
from elastic.config import ConfigError
from elastic.protocol import Action
from elastic.rendezvous import EtcdRendezvousError, NodeIdTaken, NodeLease, RunStore, connect
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValueClient
from elastic.rendezvous.records import AbortRecord, RoundRecord
from elastic.rendezvous.rounds import JoinSettings, RoundJoiner
from elastic.rendezvous.run_store import validate_control
from elastic.rendezvous.view import GroupView, Snapshot

# A node whose last published state is one of these left on purpose (finished, or drained with
# the group's checkpoint): its departure breaks no running round.
GRACEFUL_EXIT_STATES = frozenset({"stopped", "draining"})
# The daemon's lifecycle state -> its published record state. Rounds come and go without a
# write: joining, running and waiting are all "active" (expected in the next round).
RECORD_STATES = {"joining": "active", "running": "active", "waiting": "active"}
# Fields whose change is worth a write that every node receives.
MEMBERSHIP_FIELDS = ("state", "detail", "last_failure", identity.FINGERPRINT_KEY, "address")
COMPUTE_BAND = 0.1  # republish the straggler value when it moves by more than 10 %
EVENT_QUEUE_SIZE = 1000  # events waiting for etcd; older ones dropped beyond this
EVENT_FLUSH_SECONDS = 5.0  # at close, time given to send the queued events
RUN_STATUS_SECONDS = 30.0  # rank 0 refreshes the run's last step at most this often
REGISTER_RETRY_SECONDS = 0.5


class GroupUnavailable(Exception):
    """No round could be formed now (fewer than ``nodes.min`` alive, or etcd unreachable)."""


@dataclasses.dataclass
class _Local:
    """This node's own facts (not from the watch); guarded by ``Group._lock``."""

    round: RoundRecord | None = None  # the round this node trains in (or last trained in)
    after_round: int = 0  # the next round must be newer than this
    lost_rounds: set[int] = dataclasses.field(default_factory=set)
    fenced_rounds: set[int] = dataclasses.field(default_factory=set)
    announced_rounds: set[int] = dataclasses.field(default_factory=set)
    relayed_pause: bool = False
    consumed_rewind_seq: int = 0


class Group:
    def __init__(
        self,
        config: DaemonConfig,
        *,
        node: str,
        endpoints: tuple[str, ...],
        metrics: NodeMetrics,
        wake: Callable[[], None] = lambda: None,
        kv: KeyValueClient | None = None,
    ) -> None:
        """``kv``: an etcd client to use (unit tests pass an in-memory one); default: connect
        to ``endpoints``. Either way the group closes it."""
        self.config = config
        self.node = node
        self.metrics = metrics
        self._wake = wake  # tells the supervisor that the watch saw something to act on
        self.log = jsonlog.get("daemon.group")
        self.etcd = dataclasses.replace(config.etcd, endpoints=endpoints)
        self.kv = kv if kv is not None else connect(self.etcd)
        run_id, prefix = config.run_id, self.etcd.key_prefix
        self.keys = RunKeys(prefix, run_id)
        self.store = RunStore(self.kv, run_id=run_id, key_prefix=prefix)
        self.lease = NodeLease(
            self.kv,
            run_id=run_id,
            key_prefix=prefix,
            ttl_seconds=self.etcd.ttl_seconds,
            on_expired=self._on_lease_expired,
            on_health=self._on_etcd_health,
        )
        self.view = GroupView(self.kv, self.keys, check_control=validate_control)
        self.view.subscribe(self._on_change)
        address = config.nodes.address or socket.getfqdn()
        self.joiner = RoundJoiner(
            self.kv,
            self.keys,
            self.view,
            name=node,
            addr=address,
            lease_id=lambda: self.lease.lease_id,
            port=lambda: free_port("0.0.0.0"),
            expected=_expected,
        )
        self._lock = threading.Lock()
        self._local = _Local()
        self._etcd_up = True
        self._publisher = _Publisher(self)
        self._events = _EventSender(self)

    # ----------------------------------------------------------------- lifecycle
    def register(self, status: dict[str, Any]) -> None:
        """Refuse to join a run whose live members train another config (ConfigError), then
        take this node's key (NodeIdTaken while another live daemon holds the id)."""
        snap = self.view.start().snapshot
        members = {n: dict(i) for n, i in snap.nodes.items() if n != self.node}
        problem = identity.mismatch(status.get(identity.FINGERPRINT_KEY, ""), members)
        if problem is not None:
            raise ConfigError(problem)
        record = self._publisher.record(status)
        self._take_node_id(record)
        self._publisher.start(record)
        self._events.start()
        with self._lock:
            # A closed round listing this node is from before this daemon started: never ours.
            current = self.view.snapshot.round
            if current is not None:
                self._local.after_round = current.round - (0 if current.closed else 1)
        self.metrics.set_etcd_up(True)

    def _take_node_id(self, record: dict[str, Any]) -> None:
        """Register, waiting out a predecessor's lease: a daemon restarted after a crash (a pod
        restart keeps its name) finds its old key alive for up to one TTL. A holder that is
        still there after that keeps its lease alive: a live daemon with this id."""
        deadline = time.monotonic() + self.etcd.ttl_seconds + 2 * REGISTER_RETRY_SECONDS
        while True:
            try:
                self.lease.register(self.node, record)
                return
            except NodeIdTaken:
                if time.monotonic() > deadline:
                    raise
                self.log.info("node_id_held", node=self.node, note="waiting for its lease")
                time.sleep(REGISTER_RETRY_SECONDS)

    def close(self) -> None:
        self._publisher.stop()
        self._events.stop(flush_seconds=EVENT_FLUSH_SECONDS)
        self.view.close()
        self._quietly(self.lease.revoke)
        self._quietly(self.kv.close)

    def leave(self) -> None:
        """Graceful exit: withdraw from an open round and revoke the lease now, so the others
        see the departure at once and form their next round without waiting for this node."""
        self._publisher.flush()
        self._publisher.stop()
        self._events.stop(flush_seconds=EVENT_FLUSH_SECONDS)
        self.joiner.withdraw()
        self._quietly(self.lease.revoke)

    # ----------------------------------------------------------------- rounds
    def join(
        self, *, restart_count: int, should_stop: Callable[[], bool]
    ) -> RoundAssignment | None:
        started = time.monotonic()
        min_nodes, max_nodes = self.bounds()
        n = self.config.nodes
        settings = JoinSettings(
            min_nodes=min_nodes,
            max_nodes=max_nodes,
            last_call_seconds=n.last_call_seconds,
            timeout_seconds=n.join_timeout_seconds,
        )
        with self._lock:
            after_round = self._local.after_round
        try:
            record = self.joiner.join(settings, after_round=after_round, should_stop=should_stop)
        except EtcdRendezvousError as exc:
            raise GroupUnavailable(f"no round formed: {type(exc).__name__}: {exc}") from exc
        if record is None:
            return None
        rank = record.rank_of(self.node)
        assert rank is not None, "join() returns only rounds that list this node"
        self.log.info(
            "round",
            round=record.round,
            group_rank=rank,
            nodes=len(record.participants),
            seconds=round(time.monotonic() - started, 3),
        )
        with self._lock:
            self._local.round, self._local.after_round = record, record.round
        self.joiner.remember(record)
        self._publisher.poke()
        return RoundAssignment(
            round_id=record.round,
            group_rank=rank,
            num_nodes=len(record.participants),
            nproc_per_node=self.config.nproc_per_node,
            master_addr=record.master_addr,
            master_port=record.master_port,
            restart_count=restart_count,
        )

    def bounds(self) -> tuple[int, int]:
        """(min, max) nodes: an operator's ``scale`` request, else the config's."""
        scale = self.view.snapshot.control.get("scale")
        if isinstance(scale, Mapping):
            return int(scale["min_nodes"]), int(scale["max_nodes"])
        return self.config.nodes.min, self.config.nodes.max

    def members(self) -> dict[str, dict[str, Any]]:
        """Records of the live members of this node's round (``round`` added to each)."""
        with self._lock:
            record = self._local.round
        if record is None:
            return {}
        nodes = self.view.snapshot.nodes
        return {
            name: {**nodes[name], "round": record.round}
            for name in record.participants
            if name in nodes
        }

    # ----------------------------------------------------------------- questions per tick
    def regroup_wanted(self, assignment: RoundAssignment) -> bool:
        """A newer round exists (a node waits to join, or restarts elsewhere), or an operator
        changed the bounds this round formed under."""
        snap = self.view.snapshot
        if snap.round is not None and snap.round.round > assignment.round_id:
            return True
        with self._lock:
            record = self._local.round
        if record is None or record.round != assignment.round_id:
            return False
        return self.bounds() != (record.min_nodes, record.max_nodes)

    def peer_failed(self, assignment: RoundAssignment) -> bool:
        if assignment.round_id in self.view.snapshot.aborts:
            return True
        with self._lock:
            return assignment.round_id in self._local.announced_rounds

    def member_lost(self, assignment: RoundAssignment) -> bool:
        with self._lock:
            return assignment.round_id in self._local.lost_rounds

    def fenced(self, assignment: RoundAssignment) -> bool:
        """This node's lease expired during the round: the others dropped it (fencing)."""
        with self._lock:
            return assignment.round_id in self._local.fenced_rounds

    def announce_failure(self, assignment: RoundAssignment, detail: str) -> None:
        with self._lock:
            self._local.announced_rounds.add(assignment.round_id)
        record = AbortRecord(node=self.node, detail=detail)
        key = self.keys.abort(assignment.round_id)
        self._quietly(lambda: self.kv.put(key, record.to_bytes()))

    def take_control(self) -> list[dict[str, Any]]:
        """Requests for this node's workers since the last call (pause/resume/rewind)."""
        control = self.view.snapshot.control
        paused = bool(control.get("paused", False))
        rewind, seq = control.get("rewind"), int(control.get("seq", 0))
        out: list[dict[str, Any]] = []
        with self._lock:
            record, local = self._local.round, self._local
            is_rank0 = record is not None and record.rank_of(self.node) == 0
            if paused != local.relayed_pause:
                local.relayed_pause = paused
                out.append({"action": Action.PAUSE if paused else Action.RESUME})
            # One-shot: the trainer takes rank 0's value, so rank 0's node consumes it; seq:
            # the deletion below reaches the snapshot later, never relay one request twice.
            relay = isinstance(rewind, Mapping) and is_rank0 and seq > local.consumed_rewind_seq
            if relay:
                local.consumed_rewind_seq = seq
        if relay:
            assert isinstance(rewind, Mapping)
            out.append({"action": Action.REWIND, "to_step": int(rewind["to_step"])})
            self._quietly(lambda: self.store.put_control({"rewind": None}))
        return out

    def control_seq(self) -> int:
        return int(self.view.snapshot.control.get("seq", 0))

    def take_restart(self, after_seq: int) -> tuple[int, int] | None:
        """A diverged node's way back: (seq, step) of an operator's rewind requested after
        control seq ``after_seq`` (None: none yet). This node never relays it to running
        workers; the request stays in etcd for the other diverged nodes until
        :meth:`clear_restart` (once the restarted round trains)."""
        request = _rewind_request(self.view.snapshot)
        if request is None or request[0] <= after_seq:
            return None
        with self._lock:
            self._local.consumed_rewind_seq = max(self._local.consumed_rewind_seq, request[0])
        self._publisher.run_marked = False  # training again: rank 0 reports the run's state
        return request

    def clear_restart(self, seq: int) -> None:
        """Delete the operator's restart request ``seq`` (a node that joins later must not take
        it for a rewind of the running group); a newer request is left alone."""
        request = _rewind_request(self.view.snapshot)
        if request is not None and request[0] == seq:
            self._quietly(lambda: self.store.put_control({"rewind": None}))

    # ----------------------------------------------------------------- status and events
    def event(self, record: dict[str, Any]) -> None:
        """Append ``record`` to the run's event log, off the caller's thread (the workers'
        output relay calls this: an unreachable etcd must not block their stdout)."""
        self._events.send({"node": self.node, **record})

    def set_status(self, status: dict[str, Any]) -> None:
        """This node's latest status; the publisher writes it only if others need it."""
        self._publisher.offer(status)

    def publish_node_status(self, status: dict[str, Any]) -> None:
        """A lifecycle transition: considered at once (on the publisher's thread)."""
        self._publisher.offer(status)

    def mark_run(self, state: str) -> None:
        def put() -> None:
            current = self.store.get_status() or {}
            self.store.put_status({**current, "state": state, "reported_by": self.node})

        with self._publisher.run_lock:
            self._publisher.run_marked = True
            self._quietly(put)

    def run_status(self, status: Mapping[str, Any]) -> dict[str, Any]:
        """The run's status as rank 0 reports it (no per-node records: elasticctl reads those
        from ``group/nodes/``; at 2,048 nodes they would not fit in one value)."""
        with self._lock:
            record = self._local.round
        min_nodes, max_nodes = self.bounds()
        participants = record.participants if record is not None else ()
        return {
            "state": status.get("state"),
            "round": record.round if record is not None else None,
            "nodes": list(participants),
            "min_nodes": min_nodes,
            "max_nodes": max_nodes,
            "world_size": len(participants) * self.config.nproc_per_node,
            "last_step": status.get("last_step"),
            "checkpoint_url": self.config.checkpoint.url,
            "nproc_per_node": self.config.nproc_per_node,
            "reported_by": self.node,
            "train": status.get("train"),  # rank 0's newest step line (loss, tokens/s, ...)
        }

    def is_rank0(self) -> bool:
        with self._lock:
            record = self._local.round
        return record is not None and record.rank_of(self.node) == 0

    # ----------------------------------------------------------------- background
    def _on_change(self, old: Snapshot, new: Snapshot) -> None:
        """The watch thread: match departures to our round, wake the supervisor when a newer
        round, an abort of ours or a lost member appeared."""
        for node in old.nodes.keys() - new.nodes.keys():
            self.log.info("node_left", other=node, state=old.nodes[node].get("state"))
        for node in new.nodes.keys() - old.nodes.keys():
            self.log.info("node_joined", other=node)
        with self._lock:
            record = self._local.round
        if record is None:
            return
        gone = [n for n in old.nodes if n not in new.nodes and n in record.participants]
        lost = [n for n in gone if old.nodes[n].get("state") not in GRACEFUL_EXIT_STATES]
        if lost:
            with self._lock:
                self._local.lost_rounds.add(record.round)
            self.log.info("node_lost", others=lost, round=record.round)
        newer = new.round is not None and new.round.round > record.round
        aborted = record.round in new.aborts and record.round not in old.aborts
        if lost or aborted or (newer and new.round != old.round) or new.control != old.control:
            self._wake()

    def _on_lease_expired(self) -> None:
        """etcd answered and no longer knew this node's lease (the keep-alive thread calls this
        after re-creating it). The others counted this node as lost and may train in a round
        without it: its workers must stop before their next step or checkpoint commit in the
        old group, and the node rejoins through a new round."""
        with self._lock:
            record = self._local.round
            if record is not None:
                self._local.fenced_rounds.add(record.round)
        self.log.warning("fenced", round=record.round if record else None, reason="lease expired")
        self._wake()

    def _on_etcd_health(self, up: bool) -> None:
        """The keep-alive's verdict on etcd (every TTL/3): a metric, and a line on change."""
        with self._lock:
            changed, self._etcd_up = up != self._etcd_up, up
        if changed:
            self.log.info("etcd_up" if up else "etcd_down")
        self.metrics.set_etcd_up(up)

    def _quietly(self, action: Callable[[], Any]) -> None:
        """etcd writes that must not take the node down: log and go on (a lost status write is
        repaired by the next transition)."""
        try:
            action()
        except (EtcdRendezvousError, RuntimeError) as exc:
            self.log.warning("etcd_write_failed", error=str(exc)[:200])
            self._on_etcd_health(False)


def _expected(snap: Snapshot) -> set[str]:
    """The nodes a re-formed round waits for: every live node that is active."""
    return {name for name, info in snap.nodes.items() if info.get("state") == "active"}


def _rewind_request(snap: Snapshot) -> tuple[int, int] | None:
    rewind = snap.control.get("rewind")
    if not isinstance(rewind, Mapping):
        return None
    return int(snap.control.get("seq", 0)), int(rewind["to_step"])


class _EventSender:
    """Appends the node's events to the run's event log in order, on its own thread. The queue
    is bounded: during a long etcd outage the oldest unsent events are dropped (counted in one
    ``events_dropped`` line), never the caller blocked."""

    def __init__(self, group: Group) -> None:
        self._group = group
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=EVENT_QUEUE_SIZE)
        self._dropped = 0
        self._thread = threading.Thread(target=self._loop, name="group-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, record: dict[str, Any]) -> None:
        while True:
            try:
                self._queue.put_nowait(record)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                    self._dropped += 1

    def stop(self, *, flush_seconds: float) -> None:
        """Send what is queued (for at most ``flush_seconds``), then end the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=flush_seconds)
        self._thread.join(flush_seconds)

    def _loop(self) -> None:
        while (record := self._queue.get()) is not None:
            if self._dropped:
                self._group.log.warning("events_dropped", count=self._dropped)
                self._dropped = 0
            self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        group = self._group
        group._quietly(lambda: group.store.append_event(record))


class _Publisher:
    """The one place that writes this node's record (and, on rank 0, the run status).

    ``offer()`` hands over the latest status; a thread writes it when it differs from what was
    published in a field others act on, so a running node does not write every tick. Writes
    run off the supervisor's thread: an unreachable etcd must not stall the watchdog.
    """

    def __init__(self, group: Group) -> None:
        self._group = group
        self._cond = threading.Condition()
        self._pending: dict[str, Any] | None = None
        self._last_status: dict[str, Any] | None = None
        self._published: dict[str, Any] = {}
        self._run_published: tuple[Any, ...] = ()
        self._run_published_at = 0.0
        self._stopped = False
        self.run_lock = threading.Lock()
        self.run_marked = False  # mark_run() set the run's state: status refreshes leave it
        self._thread = threading.Thread(target=self._loop, name="group-publish", daemon=True)

    def record(self, status: Mapping[str, Any]) -> dict[str, Any]:
        """The node record for ``status``: its lifecycle state mapped to a record state."""
        state = str(status.get("state", "starting"))
        address = self._group.config.nodes.address
        extra = {"address": address} if address else {}
        # The step line's numbers are the run status's, not the node record's: every node
        # watches the records.
        own = {k: v for k, v in status.items() if k != "train"}
        return {**own, **extra, "state": RECORD_STATES.get(state, state)}

    def start(self, record: dict[str, Any]) -> None:
        self._published = record
        self._thread.start()

    def offer(self, status: Mapping[str, Any]) -> None:
        with self._cond:
            self._pending = dict(status)
            self._cond.notify()

    def poke(self) -> None:
        """A new round: rank 0 may have moved (the run status is its to publish)."""
        with self._cond:
            if self._pending is None and self._last_status is not None:
                self._pending = self._last_status
            self._cond.notify()

    def flush(self) -> None:
        """Write a pending record now, on the caller's thread (before leaving)."""
        with self._cond:
            status, self._pending = self._pending, None
        if status is not None:
            self._publish(status, force=True)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                status, self._pending = self._pending, None
            assert status is not None
            self._publish(status, force=False)

    def _publish(self, status: dict[str, Any], *, force: bool) -> None:
        group = self._group
        self._last_status = status
        record = self.record(status)
        if _worth_writing(self._published, record) or (force and record != self._published):
            # force: leaving (the record's last words); otherwise transitions between
            # rounds map to the same record state and write nothing.
            group._quietly(lambda: group.lease.update(record))
            self._published = record
        if group.is_rank0():
            self._publish_run(status)

    def _publish_run(self, status: Mapping[str, Any]) -> None:
        group = self._group
        run = group.run_status(status)
        key = (run["state"], run["round"], tuple(run["nodes"]), run["min_nodes"], run["max_nodes"])
        now = time.monotonic()
        stale = now - self._run_published_at >= RUN_STATUS_SECONDS
        if key == self._run_published and not stale:
            return
        with self.run_lock:
            if self.run_marked:
                return
            group._quietly(lambda: group.store.put_status(run))
        self._run_published, self._run_published_at = key, now


def _goodput_rates(record: Mapping[str, Any]) -> Any:
    goodput = record.get("goodput")
    return goodput.get("rates") if isinstance(goodput, Mapping) else None


def _worth_writing(published: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
    """Does ``record`` differ from ``published`` in a way other nodes act on?"""
    if any(published.get(f) != record.get(f) for f in MEMBERSHIP_FIELDS):
        return True
    if _goodput_rates(published) != _goodput_rates(record):
        return True  # readers extrapolate the goodput with the rates: a new trend is news
    before, after = published.get(STATUS_KEY), record.get(STATUS_KEY)
    if not isinstance(after, (int, float)) or after <= 0:
        return False
    if not isinstance(before, (int, float)) or before <= 0:
        return True
    return abs(after - before) > COMPUTE_BAND * before
