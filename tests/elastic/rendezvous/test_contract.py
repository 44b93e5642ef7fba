"""One contract, two implementations: the in-memory KV and a real etcd behave the same.

Covers the ``KeyValueClient`` semantics the round protocol relies on (compare-and-set on a
key's revision, atomic multi-op transactions, leases, ordered watches).
"""

from __future__ import annotations

import queue
import threading

from elastic.rendezvous.kv import DeleteRange, Op, Put, WatchEvent
from tests.elastic.rendezvous.conftest import KvFactory

WAIT_SECONDS = 10.0


# -- KeyValueClient ----------------------------------------------------------------------------


def test_commit_writes_only_when_the_revision_matches(kv_factory: KvFactory, run_id: str) -> None:
    kv = kv_factory()
    key = f"/test/{run_id}/k"
    created = kv.commit(key, expected_mod_revision=0, ops=[Put(key, b"a")])
    assert created.succeeded and created.current is not None
    assert created.current.value == b"a"

    again = kv.commit(key, expected_mod_revision=0, ops=[Put(key, b"b")])
    assert not again.succeeded
    assert again.current == created.current

    revision = created.current.mod_revision
    updated = kv.commit(key, expected_mod_revision=revision, ops=[Put(key, b"c")])
    assert updated.succeeded and updated.current is not None
    assert updated.current.value == b"c"
    assert updated.current.mod_revision > revision


def test_commit_applies_all_ops_or_none(kv_factory: KvFactory, run_id: str) -> None:
    kv = kv_factory()
    root = f"/test/{run_id}/"
    kv.put(root + "old/1", b"x")
    kv.put(root + "old/2", b"y")
    ops: list[Op] = [Put(root + "new", b"n"), DeleteRange(root + "old/", root + "old0")]
    assert not kv.commit(root + "guard", expected_mod_revision=99, ops=ops).succeeded
    assert kv.get(root + "new") is None and kv.get(root + "old/1") is not None

    assert kv.commit(root + "guard", expected_mod_revision=0, ops=ops).succeeded
    kvs, _ = kv.get_prefix(root)
    assert [item.key for item in kvs] == [root + "new"]


def test_get_prefix_is_sorted_and_delete_prefix_removes_only_the_prefix(
    kv_factory: KvFactory, run_id: str
) -> None:
    kv = kv_factory()
    root = f"/test/{run_id}/"
    for name in ("b", "a", "c/1", "c/2"):
        kv.put(root + name, name.encode())
    kvs, revision = kv.get_prefix(root)
    assert [item.key[len(root) :] for item in kvs] == ["a", "b", "c/1", "c/2"]
    assert revision >= max(item.mod_revision for item in kvs)
    assert kv.delete_prefix(root + "c/") == 2
    assert kv.delete(root + "a") and not kv.delete(root + "a")
    assert [item.key for item in kv.get_prefix(root)[0]] == [root + "b"]


def test_revoking_a_lease_deletes_its_keys(kv_factory: KvFactory, run_id: str) -> None:
    kv = kv_factory()
    key = f"/test/{run_id}/leased"
    lease_id = kv.grant_lease(30)
    kv.put(key, b"v", lease_id=lease_id)
    stored = kv.get(key)
    assert stored is not None and stored.lease_id == lease_id
    assert kv.refresh_lease(lease_id) > 0
    kv.revoke_lease(lease_id)
    assert kv.get(key) is None
    assert kv.refresh_lease(lease_id) == 0
    kv.revoke_lease(lease_id)  # revoking twice is fine


def test_watch_reports_changes_in_order_from_the_start_revision(
    kv_factory: KvFactory, run_id: str
) -> None:
    kv = kv_factory()
    root = f"/test/{run_id}/w/"
    first = kv.put(root + "early", b"0")
    events: queue.Queue[WatchEvent] = queue.Queue()

    def on_events(batch: list[WatchEvent]) -> None:
        for event in batch:
            events.put(event)

    handle = kv.watch_prefix(
        root,
        start_revision=first,
        on_events=on_events,
        on_error=lambda exc: events.put(WatchEvent("delete", "ERROR", str(exc).encode(), 0)),
    )
    try:
        kv.put(root + "a", b"1")
        kv.put(f"/test/{run_id}/elsewhere", b"x")
        kv.delete(root + "a")
        seen = [events.get(timeout=WAIT_SECONDS) for _ in range(3)]
    finally:
        handle.cancel()
    assert [(e.kind, e.key[len(root) :], e.value) for e in seen] == [
        ("put", "early", b"0"),
        ("put", "a", b"1"),
        ("delete", "a", b""),
    ]


def test_concurrent_compare_and_set_has_exactly_one_winner_per_revision(
    kv_factory: KvFactory, run_id: str
) -> None:
    """What opening and closing a round rely on: of N writers holding one token, one wins and
    every loser reads the winner's value back in the same transaction."""
    num_threads, num_revisions = 16, 3
    key = f"/test/{run_id}/round"
    clients = [kv_factory() for _ in range(num_threads)]
    clients[0].put(key, b"start")
    barrier = threading.Barrier(num_threads, timeout=WAIT_SECONDS)
    outcomes: list[list[tuple[int, bool, bytes]]] = [[] for _ in range(num_revisions)]
    lock = threading.Lock()

    def contend(index: int) -> None:
        kv = clients[index]
        for revision in range(num_revisions):
            current = kv.get(key)
            assert current is not None
            barrier.wait()  # everyone holds the same token before anyone writes
            value = f"{revision}:{index}".encode()
            result = kv.commit(
                key, expected_mod_revision=current.mod_revision, ops=[Put(key, value)]
            )
            assert result.current is not None
            with lock:
                outcomes[revision].append((index, result.succeeded, result.current.value))
            barrier.wait()  # nobody reads the next token before every write of this one

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS * 3)
    assert not any(t.is_alive() for t in threads)
    for revision, results in enumerate(outcomes):
        winners = [r for r in results if r[1]]
        assert len(results) == num_threads and len(winners) == 1, f"revision {revision}"
        winner_value = f"{revision}:{winners[0][0]}".encode()
        assert {value for _, _, value in results} == {winner_value}
