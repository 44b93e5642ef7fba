"""This node's membership in the run's elastic group, over ``elastic.rendezvous``.

Everything the supervisor asks of etcd goes through :class:`Group`:

- ``join()``: one rendezvous round (torch's ``DynamicRendezvousHandler`` on the etcd v3
  backend) -> a :class:`RoundAssignment` (node rank, node count, the round's master address).
  A re-formed round completes as soon as every live node that is not leaving has joined (each
  node publishes its rendezvous name in its lease info), not after the last call; a node that
  drains out leaves the rendezvous on its way out, so nobody waits for its keep-alives to
  expire;
- liveness: a node lease (key ``nodes/<node>``, info ``{round, group_rank, state, ...}``) and a
  watch on every node's key: a member of the current round whose lease expires is ``node_lost``;
- ``announce_failure()`` / ``peer_failed()``: a crash anywhere stops every node at once (the
  round's abort key), instead of waiting for a collective to time out;
- ``regroup_wanted()``: a node is waiting to join, or an operator changed ``scale``: the group
  drains at the next step boundary and forms a new round;
- control requests (``pause``, ``resume``, ``rewind``) relayed to the workers;
- status and the bounded event log.

etcd outages: the polling thread keeps the last known answers and flags ``etcd_up=0``; nothing
here stops running workers because etcd is unreachable (a node really cut off fails its
collectives anyway, and a checkpoint commit needs every rank). Fencing: a node that reaches
etcd again and finds its lease gone (``fenced()``) stops its workers at once, before they step
or commit in the old group, and rejoins through a new round.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from torch.distributed.elastic.rendezvous.api import RendezvousError

from daemon import identity
from daemon.config import DaemonConfig
from daemon.metrics import NodeMetrics
from daemon.workers import RoundAssignment
from elastic import jsonlog
from elastic.config import ConfigError
from elastic.protocol import Action
from elastic.rendezvous import (
    EtcdRendezvousError,
    EtcdRendezvousHandler,
    NodeEvent,
    NodeIdTaken,
    NodeLease,
    NodeWatch,
    RunStore,
    connect,
    create_handler,
)
from elastic.rendezvous.aborts import RoundAborts

POLL_SECONDS = 0.5
# A node whose last published state is one of these left on purpose (finished, or drained with
# the group's checkpoint): its departure breaks no running round.
GRACEFUL_EXIT_STATES = frozenset({"stopped", "draining"})
# Live nodes in these states will not join the round being formed: nobody waits for them. A
# starting node (still warming its workers) comes later through the wait list.
NOT_JOINING_STATES = GRACEFUL_EXIT_STATES | {"failed", "diverged", "starting"}
STATUS_EVERY_POLLS = 4  # status (last step...) refreshed in etcd every 2 s
# torch's handler otherwise creates one TCPStore in the daemon on the first round and hands it
# to every later round: stale keys from a crashed round then break the next one's gloo mesh (the
# torchrun + gloo restart failure). With sharing off, each round's rank-0 worker hosts a fresh
# store on a fresh port (RendezvousStoreInfo.build on every round).
SHARE_STORE_SWITCH = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


class GroupUnavailable(Exception):
    """No round could be formed now (fewer than ``nodes.min`` alive, or etcd unreachable)."""


@dataclasses.dataclass
class _Flags:
    """What the polling thread last learned; read by the supervisor without touching etcd."""

    waiting_nodes: int = 0
    polls: int = 0  # completed polls; answers polled before a round formed are stale for it
    aborted_rounds: set[int] = dataclasses.field(default_factory=set)
    lost_rounds: set[int] = dataclasses.field(default_factory=set)
    fenced_rounds: set[int] = dataclasses.field(default_factory=set)  # our lease expired in them
    scale: tuple[int, int] | None = None
    paused: bool = False
    rewind_to: int | None = None
    # The operator's pending rewind as (control seq, to_step), whatever this node's rank: a
    # diverged group has no running rank 0 to take it.
    rewind_request: tuple[int, int] | None = None
    control_seq: int = 0
    etcd_up: bool = True


class Group:
    def __init__(
        self,
        config: DaemonConfig,
        *,
        node: str,
        endpoints: tuple[str, ...],
        metrics: NodeMetrics,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        os.environ[SHARE_STORE_SWITCH] = "1"  # read by torch inside next_rendezvous()
        self.config = config
        self.node = node
        self.metrics = metrics
        self._wake = wake  # tells the supervisor that a poll found something to act on
        self.log = jsonlog.get("daemon.group")
        self.etcd = dataclasses.replace(config.etcd, endpoints=endpoints)
        self.kv = connect(self.etcd)
        run_id, prefix = config.run_id, self.etcd.key_prefix
        self.store = RunStore(self.kv, run_id=run_id, key_prefix=prefix)
        self.aborts = RoundAborts(self.kv, run_id=run_id, key_prefix=prefix)
        self.lease = NodeLease(
            self.kv,
            run_id=run_id,
            key_prefix=prefix,
            ttl_seconds=self.etcd.ttl_seconds,
            on_expired=self._on_lease_expired,
        )
        self._members: dict[str, int] = {}  # node -> round it last announced
        self.watch = NodeWatch(
            self.kv, run_id=run_id, key_prefix=prefix, on_event=self._on_node_event
        )
        self.flags = _Flags()
        self._lock = threading.Lock()
        self._round: int | None = None
        self._group_rank: int | None = None
        self._bounds = (config.nodes.min, config.nodes.max)
        self._handler: EtcdRendezvousHandler | None = None
        self._joining = False
        self._relayed_pause = False
        self._consumed_rewind_seq = 0
        self._joined_at_poll = 0
        self._lease_info: dict[str, Any] = {}
        self._run_marked = False  # mark_run() set the run's state: status publishes leave it
        self._run_status_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="group-poll", daemon=True)

    # ----------------------------------------------------------------- lifecycle
    def register(self, status: dict[str, Any]) -> None:
        """Refuse to join a run whose live members train another config (ConfigError), then
        take this node's key (NodeIdTaken while another live daemon holds the id)."""
        members = {n: i for n, i in self.watch.start().list_nodes().items() if n != self.node}
        problem = identity.mismatch(status.get(identity.FINGERPRINT_KEY, ""), members)
        if problem is not None:
            raise ConfigError(problem)
        self._take_node_id({**status, "round": None})
        for node, info in self.watch.list_nodes().items():
            if isinstance(info.get("round"), int):
                self._members[node] = info["round"]
        self._poller.start()
        self.metrics.set_etcd_up(True)

    def _take_node_id(self, info: dict[str, Any]) -> None:
        """Register, waiting out a predecessor's lease: a daemon restarted after a crash (a pod
        restart keeps its name) finds its old key alive for up to one TTL. A holder that is
        still there after that keeps its lease alive: a live daemon with this id."""
        deadline = time.monotonic() + self.etcd.ttl_seconds + 2 * POLL_SECONDS
        while True:
            try:
                self.lease.register(self.node, info)
                return
            except NodeIdTaken:
                if time.monotonic() > deadline or self._stop.wait(POLL_SECONDS):
                    raise
                self.log.info("node_id_held", node=self.node, note="waiting for its lease")

    def close(self) -> None:
        self._stop.set()
        self.watch.close()
        self._quietly(self.lease.revoke)
        self._quietly(self.kv.close)

    def leave(self) -> None:
        """Graceful exit: leave the rendezvous and revoke the lease now, so the others see the
        departure at once and form their next round without waiting for this node."""
        if self._handler is not None:
            self._quietly(self._handler.leave)
        self._quietly(self.lease.revoke)

    # ----------------------------------------------------------------- rounds
    def join(
        self, *, restart_count: int, should_stop: Callable[[], bool]
    ) -> RoundAssignment | None:
        handler = self._current_handler()
        started = time.monotonic()
        self._joining = True
        try:
            info = handler.next_rendezvous()
        except (RendezvousError, EtcdRendezvousError) as exc:
            raise GroupUnavailable(f"no round formed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._joining = False
        self.log.info(
            "round",
            round=handler.round,
            group_rank=info.rank,
            nodes=info.world_size,
            seconds=round(time.monotonic() - started, 3),
        )
        if should_stop():
            return None
        bootstrap = info.bootstrap_store_info
        assert bootstrap is not None, "torch >= 2.5 always provides the bootstrap store info"
        with self._lock:
            self._round, self._group_rank = handler.round, info.rank
            self.flags.waiting_nodes = 0
            self._joined_at_poll = self.flags.polls
        self._publish_member(info.rank, info.world_size)
        if info.rank == 0:
            self._quietly(lambda: self.aborts.purge_before(handler.round))
        return RoundAssignment(
            round_id=handler.round,
            group_rank=info.rank,
            num_nodes=info.world_size,
            nproc_per_node=self.config.nproc_per_node,
            master_addr=bootstrap.master_addr,
            master_port=int(bootstrap.master_port),
            restart_count=restart_count,
        )

    def _current_handler(self) -> EtcdRendezvousHandler:
        with self._lock:
            bounds = self.flags.scale or self._bounds
        if self._handler is None or bounds != self._bounds:
            # A new handler over the same shared state: only min/max differ (they are local
            # settings of torch's handler). Never shutdown() the old one: that would close the
            # rendezvous for every node; the old one only leaves (its name, not this node, goes).
            if self._handler is not None:
                self._quietly(self._handler.leave)
            self._bounds = bounds
            n = self.config.nodes
            self._handler = create_handler(
                self.kv,
                run_id=self.config.run_id,
                min_nodes=bounds[0],
                max_nodes=bounds[1],
                local_addr=n.address or None,
                join_timeout_seconds=n.join_timeout_seconds,
                last_call_timeout_seconds=n.last_call_seconds,
                heartbeat_timeout_seconds=n.keep_alive_seconds * 5,
                keep_alive_interval_seconds=n.keep_alive_seconds,
                keep_alive_max_attempt=n.keep_alive_max_missed,
                poll_seconds=n.poll_seconds,
                complete_when=self._all_expected_joined,
            )
            self._publish_rdzv_name()
            self.metrics.set_group(nodes=0, world_size=0, min_nodes=bounds[0], max_nodes=bounds[1])
        return self._handler

    def _publish_member(self, group_rank: int, num_nodes: int) -> None:
        info = {"round": self._round, "group_rank": group_rank, "num_nodes": num_nodes}
        self._quietly(lambda: self.lease.update({**self._lease_info, **info, **self._rdzv()}))

    def _rdzv(self) -> dict[str, str]:
        return {"rdzv": self._handler.node_name} if self._handler is not None else {}

    def _publish_rdzv_name(self) -> None:
        with self._lock:
            info = {**self._lease_info, "round": self._round, "group_rank": self._group_rank}
        self._quietly(lambda: self.lease.update({**info, **self._rdzv()}))

    def _all_expected_joined(self, participants: frozenset[str]) -> bool:
        """May the round being formed complete now (before its last call)?

        Yes when every live node that is not leaving is a participant. Never in this node's
        first round (the others may still be starting up and not registered yet: the last
        call waits for them), and never while a live node has not published its rendezvous
        name (it cannot be matched).
        """
        if self._round is None:
            return False
        for info in self.watch.list_nodes().values():
            if info.get("state") in NOT_JOINING_STATES:
                continue
            name = info.get("rdzv")
            if not isinstance(name, str) or name not in participants:
                return False
        return True

    # ----------------------------------------------------------------- questions per tick
    def regroup_wanted(self, assignment: RoundAssignment) -> bool:
        with self._lock:
            if self.flags.polls <= self._joined_at_poll + 1:
                return False  # the last poll may have started before this round formed
            scale_changed = self.flags.scale is not None and self.flags.scale != self._bounds
            return self.flags.waiting_nodes > 0 or scale_changed

    def peer_failed(self, assignment: RoundAssignment) -> bool:
        with self._lock:
            return assignment.round_id in self.flags.aborted_rounds

    def member_lost(self, assignment: RoundAssignment) -> bool:
        with self._lock:
            return assignment.round_id in self.flags.lost_rounds

    def fenced(self, assignment: RoundAssignment) -> bool:
        """This node's lease expired during the round: the others dropped it (fencing)."""
        with self._lock:
            return assignment.round_id in self.flags.fenced_rounds

    def announce_failure(self, assignment: RoundAssignment, detail: str) -> None:
        with self._lock:
            self.flags.aborted_rounds.add(assignment.round_id)
        self._quietly(
            lambda: self.aborts.announce(assignment.round_id, {"node": self.node, "detail": detail})
        )

    def take_control(self) -> list[dict[str, Any]]:
        """Requests for this node's workers since the last call (pause/resume/rewind)."""
        out: list[dict[str, Any]] = []
        with self._lock:
            paused, rewind_to = self.flags.paused, self.flags.rewind_to
            self.flags.rewind_to = None
            is_rank0 = self._group_rank == 0
        if paused != self._relayed_pause:
            self._relayed_pause = paused
            out.append({"action": Action.PAUSE if paused else Action.RESUME})
        if rewind_to is not None and is_rank0:
            # One-shot: the trainer takes rank 0's value, so rank 0's node consumes it.
            out.append({"action": Action.REWIND, "to_step": rewind_to})
            self._quietly(lambda: self.store.put_control({"rewind": None}))
        return out

    def control_seq(self) -> int:
        with self._lock:
            return self.flags.control_seq

    def take_restart(self, after_seq: int) -> tuple[int, int] | None:
        """A diverged node's way back: (seq, step) of an operator's rewind requested after
        control seq ``after_seq`` (None: none yet). This node never relays it to running
        workers; the request stays in etcd for the other diverged nodes until
        :meth:`clear_restart` (once the restarted round trains)."""
        with self._lock:
            request = self.flags.rewind_request
            if request is None or request[0] <= after_seq:
                return None
            self._consumed_rewind_seq = max(self._consumed_rewind_seq, request[0])
            self.flags.rewind_to = None
        with self._run_status_lock:
            self._run_marked = False  # training again: rank 0 reports the run's state
        return request

    def clear_restart(self, seq: int) -> None:
        """Delete the operator's restart request ``seq`` (a node that joins later must not take
        it for a rewind of the running group); a newer request is left alone."""
        with self._lock:
            request = self.flags.rewind_request
        if request is not None and request[0] == seq:
            self._quietly(lambda: self.store.put_control({"rewind": None}))

    # ----------------------------------------------------------------- status and events
    def event(self, record: dict[str, Any]) -> None:
        self._quietly(lambda: self.store.append_event({"node": self.node, **record}))

    def set_status(self, status: dict[str, Any]) -> None:
        """Latest status for the poller to publish (no etcd call on the caller's thread)."""
        self._lease_info = dict(status)

    def publish_node_status(self, status: dict[str, Any]) -> None:
        self._lease_info = dict(status)
        with self._lock:
            info = {**status, "round": self._round, "group_rank": self._group_rank}
            is_rank0 = self._group_rank == 0
        info.update(self._rdzv())
        self._quietly(lambda: self.lease.update(info))
        # After mark_run() ("done", "diverged", "failed") that is the run's state: a later
        # periodic publish of this node's status must not overwrite it.
        if is_rank0:
            with self._run_status_lock:
                if not self._run_marked:
                    self._quietly(lambda: self.store.put_status(self._run_status(status)))

    def _run_status(self, status: dict[str, Any]) -> dict[str, Any]:
        members = self.watch.list_nodes()
        return {
            "state": status.get("state"),
            "round": self._round,
            "nodes": sorted(members),
            "members": {n: i for n, i in members.items()},
            "min_nodes": self._bounds[0],
            "max_nodes": self._bounds[1],
            "world_size": sum(1 for i in members.values() if i.get("round") == self._round)
            * self.config.nproc_per_node,
            "last_step": status.get("last_step"),
            "checkpoint_url": self.config.checkpoint.url,
            "nproc_per_node": self.config.nproc_per_node,
            "reported_by": self.node,
        }

    def mark_run(self, state: str) -> None:
        def put() -> None:
            current = self.store.get_status() or {}
            self.store.put_status({**current, "state": state, "reported_by": self.node})

        with self._run_status_lock:
            self._run_marked = True
            self._quietly(put)

    # ----------------------------------------------------------------- background
    def _on_lease_expired(self) -> None:
        """etcd answered and no longer knew this node's lease (the keep-alive thread calls this
        after re-creating it). The others counted this node as lost and may train in a round
        without it: its workers must stop before their next step or checkpoint commit in the
        old group, and the node rejoins through a new round."""
        with self._lock:
            round_id = self._round
            if round_id is not None:
                self.flags.fenced_rounds.add(round_id)
        self.log.warning("fenced", round=round_id, reason="node lease expired")
        self._wake()

    def _on_node_event(self, event: NodeEvent) -> None:
        with self._lock:
            graceful = event.info.get("state") in GRACEFUL_EXIT_STATES
            if event.kind == "left":
                last_round = self._members.pop(event.node_id, None)
                if last_round is not None and last_round == self._round and not graceful:
                    self.flags.lost_rounds.add(last_round)
        self.log.info("node_" + event.kind, other=event.node_id)
        self._wake()

    def _poll_loop(self) -> None:
        ticks = 0
        while not self._stop.wait(POLL_SECONDS):
            ticks += 1
            try:
                self._poll_once()
                if ticks % STATUS_EVERY_POLLS == 0 and self._lease_info:
                    self.publish_node_status(self._lease_info)
                up = True
            except (EtcdRendezvousError, RendezvousError) as exc:
                up = False
                self.log.warning("etcd_unreachable", error=str(exc)[:200])
            if up != self.flags.etcd_up:
                self.log.info("etcd_up" if up else "etcd_down")
            self.flags.etcd_up = up
            self.metrics.set_etcd_up(up)

    def _poll_once(self) -> None:
        with self._lock:
            round_id, handler = self._round, self._handler
        # Not while join() runs: torch's handler keeps one state copy, which the join's own
        # reads and writes must not see replaced from this thread.
        joining = self._joining
        waiting = handler.num_nodes_waiting() if handler is not None and not joining else 0
        # Nodes publish their round by updating their key after joining; remember it, so a
        # departure can be matched to the round it breaks.
        members = {
            node: info["round"]
            for node, info in self.watch.list_nodes().items()
            if isinstance(info.get("round"), int)
        }
        aborted = round_id is not None and self.aborts.get(round_id) is not None
        control = self.store.get_control()
        scale = control.get("scale")
        rewind = control.get("rewind")
        with self._lock:
            self._members.update(members)
            if not joining:
                self.flags.waiting_nodes = waiting
            self.flags.polls += 1
            if aborted and round_id is not None:
                self.flags.aborted_rounds.add(round_id)
            if scale:
                self.flags.scale = (int(scale["min_nodes"]), int(scale["max_nodes"]))
            self.flags.paused = bool(control.get("paused", False))
            seq = int(control.get("seq", 0))
            self.flags.control_seq = seq
            self.flags.rewind_request = (seq, int(rewind["to_step"])) if rewind else None
            if rewind and self._group_rank == 0 and seq > self._consumed_rewind_seq:
                # seq: the deletion below may lag a poll; never relay one request twice.
                self._consumed_rewind_seq = seq
                self.flags.rewind_to = int(rewind["to_step"])
            act = self.flags.waiting_nodes > 0 or round_id in self.flags.aborted_rounds
        if act:
            self._wake()

    def _quietly(self, action: Callable[[], Any]) -> None:
        """etcd writes that must not take the node down: log, flag, go on (the poller retries
        reads; a lost status write is repaired by the next transition)."""
        try:
            action()
        except (EtcdRendezvousError, RendezvousError, RuntimeError) as exc:
            self.log.warning("etcd_write_failed", error=str(exc)[:200])
            self.metrics.set_etcd_up(False)
