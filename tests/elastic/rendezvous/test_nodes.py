"""NodeLease and NodeWatch: unit behaviour on the in-memory KV, outages on a real etcd."""

from __future__ import annotations

import threading
import time

import pytest

from elastic.rendezvous import (
    InMemoryEtcd,
    NodeEvent,
    NodeIdTaken,
    NodeLease,
    NodeWatch,
    RunKeys,
    connect,
)
from tests.elastic.rendezvous.conftest import KvFactory, etcd_config
from tests.support.etcd import EtcdFactory

WAIT_SECONDS = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def next_event(watch: NodeWatch) -> NodeEvent:
    event = watch.get(WAIT_SECONDS)
    assert event is not None, "no node event within the wait"
    return event


def test_register_publishes_info_and_revoke_removes_it(run_id: str) -> None:
    kv = InMemoryEtcd().client()
    lease = NodeLease(kv, run_id=run_id, ttl_seconds=5)
    lease.register("node-a", {"state": "active", "addr": "10.0.0.1", "gpus": 8})
    stored = kv.get(lease.key)
    assert stored is not None and stored.lease_id == lease.lease_id
    assert stored.value == b'{"addr":"10.0.0.1","gpus":8,"state":"active","v":1}'
    lease.update({"state": "active", "addr": "10.0.0.1", "gpus": 4})
    assert kv.get(lease.key) is not None
    lease.revoke()
    assert kv.get(lease.key) is None


def test_an_expired_lease_is_recreated_and_reported(run_id: str) -> None:
    memory = InMemoryEtcd()
    kv = memory.client()
    expired = threading.Event()
    lease = NodeLease(kv, run_id=run_id, ttl_seconds=1, on_expired=expired.set)
    lease.register("node-a", {"state": "active", "addr": "a"})
    first_lease = lease.lease_id
    memory.revoke_all_leases()  # etcd dropped it, e.g. after a partition longer than the TTL
    assert kv.get(lease.key) is None
    try:
        assert expired.wait(WAIT_SECONDS)
        stored = kv.get(lease.key)
        assert stored is not None and stored.lease_id not in (0, first_lease)
        assert lease.expired_count == 1
    finally:
        lease.revoke()


def test_a_node_id_held_by_a_live_lease_is_refused(kv_factory: KvFactory, run_id: str) -> None:
    kv = kv_factory()
    first = NodeLease(kv, run_id=run_id, ttl_seconds=5)
    first.register("node-a", {"state": "active"})
    second = NodeLease(kv_factory(), run_id=run_id, ttl_seconds=5)
    try:
        with pytest.raises(NodeIdTaken, match=r"'node-a'.*state active"):
            second.register("node-a", {"state": "starting"})
        stored = kv.get(first.key)
        assert stored is not None and stored.lease_id == first.lease_id  # not overwritten
        assert stored.value == b'{"state":"active","v":1}'
        first.revoke()
        second.register("node-a", {"state": "starting"})  # free again once the holder left
        stored = kv.get(second.key)
        assert stored is not None and stored.lease_id == second.lease_id
    finally:
        first.revoke()
        second.revoke()


def test_a_lease_that_lost_its_id_meanwhile_stops_instead_of_fighting(run_id: str) -> None:
    memory = InMemoryEtcd()
    kv = memory.client()
    lost = threading.Event()
    first = NodeLease(kv, run_id=run_id, ttl_seconds=1, on_expired=lost.set)
    first.register("node-a", {"state": "active", "who": "first"})
    memory.revoke_all_leases()  # first's lease expired (a partition longer than the TTL)...
    second = NodeLease(kv, run_id=run_id, ttl_seconds=5)
    second.register(
        "node-a", {"state": "active", "who": "second"}
    )  # ...and a new daemon took the id
    try:
        assert lost.wait(WAIT_SECONDS)
        assert first.taken
        stored = kv.get(second.key)
        assert stored is not None and stored.value == b'{"state":"active","v":1,"who":"second"}'
    finally:
        second.revoke()
        first.revoke()


def test_watch_reports_joins_and_leaves_after_the_initial_listing(run_id: str) -> None:
    kv = InMemoryEtcd().client()
    present = NodeLease(kv, run_id=run_id, ttl_seconds=5)
    present.register("node-a", {"state": "active", "addr": "a"})
    watch = NodeWatch(kv, run_id=run_id).start()
    try:
        assert watch.list_nodes() == {"node-a": {"state": "active", "addr": "a"}}
        newcomer = NodeLease(kv, run_id=run_id, ttl_seconds=5)
        newcomer.register("node-b", {"state": "active", "addr": "b"})
        assert next_event(watch) == NodeEvent("joined", "node-b", {"state": "active", "addr": "b"})
        present.revoke()
        assert next_event(watch) == NodeEvent("left", "node-a", {"state": "active", "addr": "a"})
        assert watch.list_nodes() == {"node-b": {"state": "active", "addr": "b"}}
        newcomer.revoke()
    finally:
        watch.close()


def test_watch_reports_what_changed_while_etcd_was_unreachable(run_id: str) -> None:
    clock = FakeClock()
    memory = InMemoryEtcd(clock=clock)
    kv = memory.client()
    for node_id in ("node-a", "node-b"):
        lease_id = kv.grant_lease(5 if node_id == "node-a" else 60)
        kv.put(
            RunKeys("/elasticd", run_id).node(node_id),
            b'{"state":"active","v":1}',
            lease_id=lease_id,
        )
    events: list[NodeEvent] = []
    got_event = threading.Event()

    def on_event(event: NodeEvent) -> None:
        events.append(event)
        got_event.set()

    watch = NodeWatch(kv, run_id=run_id, on_event=on_event, retry_seconds=0.01).start()
    try:
        memory.disconnect()
        clock.now += 10  # node-a's lease runs out while nobody can see it
        memory.expire_leases()
        memory.reconnect()
        assert got_event.wait(WAIT_SECONDS)
        assert events == [NodeEvent("left", "node-a", {"state": "active"})]
        assert watch.resyncs >= 1
        assert set(watch.list_nodes()) == {"node-b"}
    finally:
        watch.close()


def test_lease_and_watch_carry_on_across_an_etcd_restart(
    etcd_factory: EtcdFactory, run_id: str
) -> None:
    server = etcd_factory()
    config = etcd_config(server, connect_timeout_seconds=1.0, request_timeout_seconds=1.0)
    owner, observer = connect(config), connect(config)
    lease = NodeLease(owner, run_id=run_id, ttl_seconds=5, retry_seconds=0.1)
    watch = NodeWatch(observer, run_id=run_id, retry_seconds=0.1)
    try:
        lease.register("node-a", {"state": "active", "addr": "a"})
        watch.start()
        server.restart()
        late = NodeLease(owner, run_id=run_id, ttl_seconds=5)
        late.register("node-b", {"state": "active", "addr": "b"})
        # The joined event crosses the restart: the watch re-listed and watches again.
        assert next_event(watch) == NodeEvent("joined", "node-b", {"state": "active", "addr": "b"})
        deadline = time.monotonic() + WAIT_SECONDS
        while watch.resyncs < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watch.resyncs >= 1
        # The lease survived (etcd persists leases) and its keep-alive reconnected.
        assert lease.expired_count == 0
        assert observer.get(lease.key) is not None
        late.revoke()
        assert next_event(watch) == NodeEvent("left", "node-b", {"state": "active", "addr": "b"})
    finally:
        watch.close()
        lease.revoke()
        owner.close()
        observer.close()
