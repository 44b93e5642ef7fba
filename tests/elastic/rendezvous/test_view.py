"""GroupView: one watch on ``group/`` kept as an immutable Snapshot, on memory and a real etcd."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from elastic.rendezvous import InMemoryEtcd, KeyValueClient, RunKeys
from elastic.rendezvous.kv import DeleteRange, Put
from elastic.rendezvous.records import AbortRecord, RoundRecord, encode, encode_node
from elastic.rendezvous.view import GroupView, Snapshot
from tests.elastic.rendezvous.conftest import KvFactory

WAIT_SECONDS = 10.0
PREFIX = "/elasticd-view"


def closed_round(round_: int, *participants: str) -> RoundRecord:
    names = tuple(sorted(participants or ("node-a",)))
    return RoundRecord(
        round=round_,
        state="closed",
        opener=names[0],
        min_nodes=1,
        max_nodes=8,
        participants=names,
        master_addr="10.0.0.1",
        master_port=29500,
    )


@pytest.fixture
def views() -> Iterator[Callable[..., GroupView]]:
    """``views(kv, keys)`` starts a GroupView; each is closed at teardown."""
    started: list[GroupView] = []

    def start(kv: KeyValueClient, keys: RunKeys, *, retry_seconds: float = 0.5) -> GroupView:
        started.append(GroupView(kv, keys, retry_seconds=retry_seconds).start())
        return started[-1]

    try:
        yield start
    finally:
        for view in started:
            view.close()


def settled(view: GroupView, predicate: Callable[[Snapshot], bool]) -> Snapshot:
    snap = view.wait_for(predicate, WAIT_SECONDS)
    assert snap is not None, f"the view did not get there within {WAIT_SECONDS} s: {view.snapshot}"
    return snap


def eventually(predicate: Callable[[], bool]) -> None:
    """A bounded wait for a condition no snapshot carries (e.g. a counter bumped after a swap)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        assert time.monotonic() < deadline, f"not within {WAIT_SECONDS} s"
        time.sleep(0.01)


def test_a_snapshot_reflects_the_round_control_aborts_and_nodes(
    kv_factory: KvFactory, run_id: str, views: Callable[..., GroupView]
) -> None:
    kv, keys = kv_factory(), RunKeys(PREFIX, run_id)
    view = views(kv, keys)
    assert view.snapshot == Snapshot()  # nothing there yet
    lease = kv.grant_lease(30)
    kv.put(keys.node("node-a"), encode_node({"state": "active", "addr": "h"}), lease_id=lease)
    kv.put(keys.round, closed_round(3, "node-a").to_bytes())
    kv.put(keys.control, encode({"paused": True, "seq": 2}))
    kv.put(keys.abort(3), AbortRecord(node="node-a", detail="exit 1").to_bytes())

    snap = settled(view, lambda s: 3 in s.aborts and bool(s.control))
    round_kv = kv.get(keys.round)
    assert round_kv is not None
    assert snap.round == closed_round(3, "node-a")
    assert snap.round_revision == round_kv.mod_revision
    assert (snap.highest_round, snap.next_round) == (3, 4)
    assert dict(snap.nodes) == {"node-a": {"state": "active", "addr": "h"}}
    assert dict(snap.control) == {"paused": True, "seq": 2}
    assert dict(snap.aborts) == {3: AbortRecord(node="node-a", detail="exit 1")}

    # A view started now reads the same state from its first listing, before start() returns.
    assert views(kv_factory(), keys).snapshot == snap


def test_snapshots_are_immutable_and_a_listener_sees_the_old_and_the_new_whole(
    kv_factory: KvFactory, run_id: str, views: Callable[..., GroupView]
) -> None:
    kv, keys = kv_factory(), RunKeys(PREFIX, run_id)
    kv.put(keys.node("node-a"), encode_node({"state": "active"}))
    kv.put(keys.round, closed_round(1, "node-a").to_bytes())
    kv.put(keys.abort(1), AbortRecord(node="node-a", detail="d").to_bytes())
    view = views(kv, keys)
    before = view.snapshot
    seen: list[tuple[Snapshot, Snapshot]] = []
    view.subscribe(lambda old, new: seen.append((old, new)))

    # The closing transaction of round 2: a new round record and earlier aborts gone, at once.
    kv.commit(
        keys.round,
        expected_mod_revision=before.round_revision,
        ops=[Put(keys.round, closed_round(2, "node-a").to_bytes()), DeleteRange(keys.abort(1))],
    )
    settled(view, lambda s: s.highest_round == 2)
    assert len(seen) == 1, "one transaction must arrive as one snapshot"
    old, new = seen[0]
    assert old is before
    assert old.round == closed_round(1, "node-a") and 1 in old.aborts  # untouched by the swap
    assert new.round == closed_round(2, "node-a") and not new.aborts
    assert new.nodes == old.nodes

    with pytest.raises(dataclasses.FrozenInstanceError):
        new.round = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        new.nodes["node-b"] = {"state": "active"}  # type: ignore[index]
    with pytest.raises(TypeError):
        new.nodes["node-a"]["state"] = "failed"  # type: ignore[index]
    with pytest.raises(TypeError):
        old.aborts[2] = AbortRecord(node="x", detail="")  # type: ignore[index]
    with pytest.raises(TypeError):
        new.control["paused"] = True  # type: ignore[index]


def test_a_node_whose_lease_is_revoked_leaves_the_snapshot(
    kv_factory: KvFactory, run_id: str, views: Callable[..., GroupView]
) -> None:
    kv, keys = kv_factory(), RunKeys(PREFIX, run_id)
    view = views(kv, keys)
    leases = {name: kv.grant_lease(30) for name in ("node-a", "node-b")}
    for name, lease in leases.items():
        kv.put(keys.node(name), encode_node({"state": "active"}), lease_id=lease)
    settled(view, lambda s: set(s.nodes) == {"node-a", "node-b"})
    kv.revoke_lease(leases["node-a"])
    snap = settled(view, lambda s: "node-a" not in s.nodes)
    assert set(snap.nodes) == {"node-b"}


def test_an_outage_keeps_the_last_snapshot_and_the_relist_reports_what_changed_meanwhile(
    run_id: str, views: Callable[..., GroupView]
) -> None:
    memory = InMemoryEtcd()
    kv, keys = memory.client(), RunKeys(PREFIX, run_id)
    lease = kv.grant_lease(30)
    kv.put(keys.node("node-a"), encode_node({"state": "active"}), lease_id=lease)
    kv.put(keys.node("node-b"), encode_node({"state": "active"}))  # no lease: survives
    kv.put(keys.round, closed_round(4, "node-a", "node-b").to_bytes())
    view = views(kv, keys, retry_seconds=0.05)
    changes: list[tuple[Snapshot, Snapshot]] = []
    view.subscribe(lambda old, new: changes.append((old, new)))
    before = view.snapshot

    memory.disconnect()
    memory.revoke_all_leases()  # etcd dropped node-a's lease while this view could not watch
    assert view.snapshot is before  # an outage is not "everything is gone"
    memory.reconnect()
    snap = settled(view, lambda s: "node-a" not in s.nodes)
    eventually(lambda: view.resyncs >= 1)
    assert snap.round == before.round and set(snap.nodes) == {"node-b"}
    assert any("node-a" in old.nodes and "node-a" not in new.nodes for old, new in changes)

    kv.put(keys.round, closed_round(5, "node-b").to_bytes())  # and it watches again
    assert settled(view, lambda s: s.highest_round == 5).round == closed_round(5, "node-b")


def test_wait_returns_on_a_change_and_on_a_poke(
    kv_factory: KvFactory, run_id: str, views: Callable[..., GroupView]
) -> None:
    kv, keys = kv_factory(), RunKeys(PREFIX, run_id)
    view = views(kv, keys)

    def wait_in_thread(action: Callable[[], object]) -> float:
        generation = view.generation
        woke = threading.Event()
        elapsed: list[float] = []

        def waiter() -> None:
            started = time.monotonic()
            view.wait(generation, WAIT_SECONDS)
            elapsed.append(time.monotonic() - started)
            woke.set()

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        action()
        assert woke.wait(WAIT_SECONDS)
        assert view.generation > generation
        return elapsed[0]

    assert wait_in_thread(view.poke) < WAIT_SECONDS / 2
    assert wait_in_thread(lambda: kv.put(keys.round, closed_round(1).to_bytes())) < 5.0
    # A generation that already moved returns at once, without waiting for the timeout.
    started = time.monotonic()
    view.wait(view.generation - 1, WAIT_SECONDS)
    assert time.monotonic() - started < WAIT_SECONDS / 2


def test_highest_round_never_goes_backwards(run_id: str, views: Callable[..., GroupView]) -> None:
    memory = InMemoryEtcd()
    kv, keys = memory.client(), RunKeys(PREFIX, run_id)
    view = views(kv, keys, retry_seconds=0.05)
    kv.put(keys.round, closed_round(5).to_bytes())
    kv.delete(keys.round)
    snap = view.snapshot
    assert (snap.round, snap.round_revision, snap.highest_round) == (None, 0, 5)
    kv.put(keys.round, closed_round(2).to_bytes())  # a stale writer
    assert view.snapshot.round == closed_round(2) and view.snapshot.highest_round == 5

    kv.delete(keys.round)
    resyncs = view.resyncs
    memory.disconnect()
    memory.reconnect()
    eventually(lambda: view.resyncs > resyncs)
    assert view.snapshot.highest_round == 5 and view.snapshot.next_round == 6
