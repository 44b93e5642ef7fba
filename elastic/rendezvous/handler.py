"""``create_handler``: torch's ``DynamicRendezvousHandler`` over the etcd v3 backend and store.

The algorithm (join, last call, keep-alive heartbeats, dead-node removal, min/max nodes) is
torch's, unchanged. ``EtcdRendezvousHandler`` only changes which Store a round gets: a fresh
``EtcdStore`` namespace per round instead of a prefix over one shared store, and rank 0 deletes
the namespaces of earlier rounds once a round has formed, so nothing stale survives a round.

The daemon calls ``next_rendezvous()`` once per round, ``num_nodes_waiting()`` to notice
newcomers, ``leave()`` when it drains out of the group, and ``set_closed()`` / ``shutdown()``
at the end.

Round re-formation latency (a live resize or a crash restart pauses training for all of it).
Two opt-in changes to how *this* node waits inside torch's join operation, the algorithm
itself unchanged (``poll_seconds`` and ``complete_when`` of ``create_handler``):

- torch re-reads the state once a second while it waits (for the previous round to empty, for
  the last call to pass); ``poll_seconds`` re-reads it that often instead;
- torch completes a round at ``max_nodes`` or when the last call expires; ``complete_when``
  (given the participants' names) lets a participant complete it as soon as every node the
  caller expects has joined and nobody is on the wait list, instead of waiting out the last
  call for nodes that are not coming.

CPU: torch names every rendezvous event after the method that records it by calling
``inspect.stack()`` twice (a walk of the whole stack that reads source files), on every pass
of its join loop, whether or not anyone consumes the events. With 128 participants in one
process that was most of the round (9-13 s of CPU; 1.6 s without). The handler and its
executor record the same events under the same names, finding the caller's name from its
frame instead (``_caller_method``).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta

from torch.distributed import Store
from torch.distributed.elastic.events import NodeState, construct_and_record_rdzv_event
from torch.distributed.elastic.rendezvous.api import RendezvousInfo, RendezvousStoreInfo
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    RendezvousTimeout,
    _Action,
    _BackendRendezvousStateHolder,
    _DistributedRendezvousOpExecutor,
    _RendezvousContext,
    _RendezvousExitOp,
    _RendezvousJoinOp,
)

from elastic import jsonlog
from elastic.rendezvous.backend import EtcdRendezvousBackend
from elastic.rendezvous.config import EtcdConfig
from elastic.rendezvous.errors import EtcdRendezvousError
from elastic.rendezvous.etcd_client import connect
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValueClient
from elastic.rendezvous.leases import LeaseKeeper
from elastic.rendezvous.store import EtcdStore

log = jsonlog.get("elastic.rendezvous.handler")
TORCH_POLL_SECONDS = 1.0  # torch's fixed wait between two reads of the state while joining
# Participants' names (``addr_pid_localid``) -> may this incomplete round complete now?
CompleteWhen = Callable[[frozenset[str]], bool]


def _caller_method() -> str:
    """The name of the method that called ``_record`` (torch: ``inspect.stack()[2]``, twice)."""
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


class _JoinExecutor(_Executor):
    """torch's executor; only the waits of the join operation are changed (see the module doc).

    While torch's join step would wait (``SYNC``), this one re-reads the state every
    ``poll_seconds`` itself and returns to torch's loop only with an action to apply, so the
    actions, their order and the conflict handling stay torch's.
    """

    def __init__(
        self,
        handler: DynamicRendezvousHandler,
        *,
        poll_seconds: float,
        complete_when: CompleteWhen | None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(handler._this_node, handler._state_holder, handler._settings)
        self._poll_seconds = poll_seconds
        self._complete_when = complete_when
        self._sleep = sleep

    def run(  # type: ignore[override]
        self,
        state_handler: Callable[[_RendezvousContext, float], _Action],
        deadline: float,
        update_deadline: Callable[[timedelta], float] | None = None,
    ) -> None:
        if isinstance(state_handler, _RendezvousJoinOp):
            state_handler = functools.partial(self._join_step, state_handler)
        super().run(state_handler, deadline, update_deadline)

    def _join_step(
        self, join: _RendezvousJoinOp, ctx: _RendezvousContext, deadline: float
    ) -> _Action:
        while True:
            action = join(ctx, deadline)
            if action is not _Action.SYNC:
                return action
            if self._may_complete(ctx):
                return _Action.MARK_RENDEZVOUS_COMPLETE
            if self._poll_seconds >= TORCH_POLL_SECONDS:
                return action  # torch's own wait
            self._sleep(self._poll_seconds)
            self._state_holder.sync()  # a read: nothing is dirty while we only wait
            self._state = self._state_holder.state
            ctx = _RendezvousContext(ctx.node, self._state, ctx.settings)

    def _may_complete(self, ctx: _RendezvousContext) -> bool:
        state = ctx.state
        if self._complete_when is None or state.complete or state.wait_list:
            return False
        if ctx.node not in state.participants:
            return False
        if len(state.participants) < ctx.settings.min_nodes:
            return False
        return self._complete_when(frozenset(repr(node) for node in state.participants))


class EtcdRendezvousHandler(DynamicRendezvousHandler):
    """``DynamicRendezvousHandler`` whose rounds get their own ``EtcdStore`` namespace."""

    _kv: KeyValueClient
    _keys: RunKeys
    _lease: LeaseKeeper
    _owns_client: bool

    def _bind(
        self, kv: KeyValueClient, *, keys: RunKeys, lease: LeaseKeeper, owns_client: bool
    ) -> None:
        self._kv, self._keys, self._lease, self._owns_client = kv, keys, lease, owns_client

    @property
    def round(self) -> int:
        """The round this handler last synced (the one ``next_rendezvous`` joined)."""
        return int(self._state_holder.state.round)

    @property
    def node_name(self) -> str:
        """torch's descriptor of this participant: ``<addr>_<pid>_<local_id>``."""
        return repr(self._this_node)

    @property
    def keys(self) -> RunKeys:
        return self._keys

    def _get_store(self) -> Store:
        # Overrides torch's PrefixStore over one shared store: one etcd namespace per round.
        store = EtcdStore(self._kv, prefix=self._keys.store(self.round), lease=self._lease)
        self._refresh_bootstrap_info(store)
        return store

    def _refresh_bootstrap_info(self, store: EtcdStore) -> None:
        """Make every round publish and read the agents' shared TCPStore address afresh.

        torch (2.13) caches ``MASTER_ADDR``/``MASTER_PORT`` after a node's first round: rank 0
        then never writes them into a later round's store, so a node joining that round waits
        for them forever, and a non-zero rank keeps the address of a rank 0 that may be gone.
        torch calls ``_get_store`` after ranks are assigned and before it reads the cache, so
        here non-zero ranks drop the cache and rank 0 republishes what it serves.
        """
        if os.getenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0") == "1":
            return  # torch then builds fresh bootstrap info every round by itself
        rank = self._state_holder.state.participants[self._this_node]
        cached = getattr(self, "_bootstrap_store_info", None)
        if rank != 0:
            self._bootstrap_store_info = None
        elif cached is not None and getattr(self, "_shared_tcp_store_server", None) is not None:
            store.set(RendezvousStoreInfo.MASTER_ADDR_KEY, cached.master_addr)
            store.set(RendezvousStoreInfo.MASTER_PORT_KEY, str(cached.master_port))

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

    def _tune_join(self, *, poll_seconds: float, complete_when: CompleteWhen | None) -> None:
        if poll_seconds >= TORCH_POLL_SECONDS and complete_when is None:
            # torch's behaviour, unchanged, minus the cost of naming its events
            self._op_executor = _Executor(self._this_node, self._state_holder, self._settings)
            return
        if poll_seconds < TORCH_POLL_SECONDS and isinstance(
            self._state_holder, _BackendRendezvousStateHolder
        ):
            # The holder serves reads younger than its cache (1 s) from memory: a faster poll
            # must reach etcd.
            self._state_holder._cache_duration = 0
        self._op_executor = _JoinExecutor(
            self, poll_seconds=poll_seconds, complete_when=complete_when
        )

    def leave(self, *, timeout_seconds: float = 10.0) -> None:
        """Leave the group on purpose (a drained node): stop the keep-alives and remove this
        node from the current round now. The others' next round then forms at once, instead of
        after this node's keep-alives expire (``keep_alive_interval * keep_alive_max_attempt``).
        """
        self._stop_heartbeats()
        with self._heartbeat_lock:
            self._op_executor.run(_RendezvousExitOp(), time.monotonic() + timeout_seconds)

    def next_rendezvous(self) -> RendezvousInfo:
        info = super().next_rendezvous()
        if info.rank == 0:
            self._purge_earlier_rounds()
        return info

    def _purge_earlier_rounds(self) -> None:
        try:
            self._kv.delete_range(self._keys.store_root, self._keys.store(self.round))
        # Not fatal: the next round's rank 0 purges again, and the lease expires them anyway.
        except EtcdRendezvousError as exc:
            log.warning("rdzv_store_purge_failed", round=self.round, error=str(exc))

    def shutdown(self) -> bool:
        try:
            return bool(super().shutdown())
        finally:
            if self._owns_client:
                self._kv.close()


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def create_handler(
    etcd: EtcdConfig | KeyValueClient,
    *,
    run_id: str,
    min_nodes: int,
    max_nodes: int,
    local_addr: str | None = None,
    key_prefix: str | None = None,
    state_ttl_seconds: float | None = None,
    join_timeout_seconds: float = 600.0,
    last_call_timeout_seconds: float = 30.0,
    close_timeout_seconds: float = 30.0,
    heartbeat_timeout_seconds: float = 5.0,
    keep_alive_interval_seconds: float = 5.0,
    keep_alive_max_attempt: int = 3,
    poll_seconds: float = TORCH_POLL_SECONDS,
    complete_when: CompleteWhen | None = None,
) -> EtcdRendezvousHandler:
    """A rendezvous handler for ``run_id`` on etcd.

    ``etcd`` is either an ``EtcdConfig`` (a client is connected now and closed by
    ``shutdown()``) or a shared ``KeyValueClient`` the caller keeps owning. ``key_prefix`` and
    ``state_ttl_seconds`` default to the config's (a client from ``connect`` carries its config).
    ``local_addr`` is the address other nodes reach this one at (default: the FQDN).
    ``poll_seconds`` and ``complete_when`` change how this node waits while joining (module
    doc); the defaults keep torch's behaviour.
    """
    kv: KeyValueClient
    if isinstance(etcd, EtcdConfig):
        config, kv, owns = etcd, connect(etcd), True
    else:
        config, kv, owns = getattr(etcd, "config", None) or EtcdConfig(), etcd, False
    try:
        keys = RunKeys(key_prefix or config.key_prefix, run_id)
        ttl = state_ttl_seconds if state_ttl_seconds is not None else config.state_ttl_seconds
        lease = LeaseKeeper(kv, ttl_seconds=max(1, round(ttl)))
        backend = EtcdRendezvousBackend(kv, keys=keys, lease=lease)
        timeout = RendezvousTimeout(
            join=_seconds(join_timeout_seconds),
            last_call=_seconds(last_call_timeout_seconds),
            close=_seconds(close_timeout_seconds),
            heartbeat=_seconds(heartbeat_timeout_seconds),
        )
        handler = EtcdRendezvousHandler.from_backend(
            run_id,
            EtcdStore(kv, prefix=keys.store_root, lease=lease),
            backend,
            min_nodes,
            max_nodes,
            local_addr,
            timeout,
            keep_alive_interval=keep_alive_interval_seconds,  # type: ignore[arg-type]  # seconds
            keep_alive_max_attempt=keep_alive_max_attempt,
        )
    except BaseException:
        if owns:
            kv.close()
        raise
    assert isinstance(handler, EtcdRendezvousHandler)
    handler._bind(kv, keys=keys, lease=lease, owns_client=owns)
    handler._tune_join(poll_seconds=poll_seconds, complete_when=complete_when)
    return handler
