"""One contract, two implementations: the in-memory KV and a real etcd behave the same.

Covers the ``KeyValueClient`` semantics the package relies on and torch's ``RendezvousBackend``
contract (compare-and-set on the state key's revision) on top of it.
"""

from __future__ import annotations

import queue
import threading

import pytest

from elastic.rendezvous import EtcdRendezvousBackend, RunKeys
from elastic.rendezvous.backend import ConflictBackoff
from elastic.rendezvous.kv import DeleteRange, KeyValueClient, Op, Put, WatchEvent
from elastic.rendezvous.leases import LeaseKeeper
from tests.elastic.rendezvous.conftest import KvFactory

WAIT_SECONDS = 10.0


def backend_for(kv: KeyValueClient, run_id: str) -> EtcdRendezvousBackend:
    lease = LeaseKeeper(kv, ttl_seconds=60)
    return EtcdRendezvousBackend(kv, keys=RunKeys("/test", run_id), lease=lease)


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


# -- RendezvousBackend -------------------------------------------------------------------------


def test_get_state_is_none_before_the_first_set(kv_factory: KvFactory, run_id: str) -> None:
    assert backend_for(kv_factory(), run_id).get_state() is None


def test_set_state_without_token_creates_the_state_once(kv_factory: KvFactory, run_id: str) -> None:
    backend = backend_for(kv_factory(), run_id)
    result = backend.set_state(b"first")
    assert result is not None
    state, token, has_set = result
    assert (state, has_set) == (b"first", True)

    result = backend.set_state(b"second")
    assert result == (b"first", token, False)


def test_set_state_returns_current_state_when_token_is_stale(
    kv_factory: KvFactory, run_id: str
) -> None:
    backend = backend_for(kv_factory(), run_id)
    created = backend.set_state(b"v1")
    assert created is not None
    _, stale_token, _ = created
    updated = backend.set_state(b"v2", stale_token)
    assert updated is not None and updated[2]

    result = backend.set_state(b"v3", stale_token)
    assert result == (b"v2", updated[1], False)
    assert backend.get_state() == (b"v2", updated[1])


@pytest.mark.parametrize("token", ["not-a-token", 0, -5, True])
def test_set_state_treats_a_foreign_token_as_stale(
    kv_factory: KvFactory, run_id: str, token: object
) -> None:
    backend = backend_for(kv_factory(), run_id)
    created = backend.set_state(b"v1")
    assert created is not None
    assert backend.set_state(b"v2", token) == (b"v1", created[1], False)


def test_conflict_backoff_window_doubles_per_loss_up_to_the_cap_and_resets_on_a_win() -> None:
    waits: list[float] = []
    backoff = ConflictBackoff(
        base_seconds=0.01, cap_seconds=0.05, sleep=waits.append, uniform=lambda lo, hi: hi
    )
    for _ in range(5):
        backoff.lost()
    backoff.won()
    backoff.lost()
    assert waits == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05, 0.01])


def test_a_lost_compare_and_set_waits_then_returns_the_state_as_of_after_the_wait(
    kv_factory: KvFactory, run_id: str
) -> None:
    writer = backend_for(kv_factory(), run_id)
    created = writer.set_state(b"v1")
    assert created is not None and writer.set_state(b"v2", created[1]) is not None
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # another node writes while this one backs off
        waits.append(seconds)
        current = writer.get_state()
        assert current is not None and writer.set_state(b"v3", current[1]) is not None

    kv = kv_factory()
    loser = EtcdRendezvousBackend(
        kv,
        keys=RunKeys("/test", run_id),
        lease=LeaseKeeper(kv, ttl_seconds=60),
        backoff=ConflictBackoff(sleep=sleep),
    )
    result = loser.set_state(b"mine", created[1])
    assert result is not None and len(waits) == 1
    assert result == (b"v3", writer.get_state()[1], False)  # type: ignore[index]
    current = loser.get_state()
    assert current is not None
    assert loser.set_state(b"mine", current[1]) == (b"mine", loser.get_state()[1], True)  # type: ignore[index]
    assert len(waits) == 1  # a win does not wait


def test_concurrent_compare_and_set_has_exactly_one_winner_per_revision(
    kv_factory: KvFactory, run_id: str
) -> None:
    num_threads, num_revisions = 16, 3
    backends = [backend_for(kv_factory(), run_id) for _ in range(num_threads)]
    created = backends[0].set_state(b"start")
    assert created is not None
    barrier = threading.Barrier(num_threads, timeout=WAIT_SECONDS)
    outcomes: list[list[tuple[int, bytes, object, bool]]] = [[] for _ in range(num_revisions)]
    lock = threading.Lock()

    def contend(index: int) -> None:
        backend = backends[index]
        for revision in range(num_revisions):
            current = backend.get_state()
            assert current is not None
            barrier.wait()  # everyone holds the same token before anyone writes
            result = backend.set_state(f"{revision}:{index}".encode(), current[1])
            assert result is not None
            with lock:
                outcomes[revision].append((index, *result))
            barrier.wait()  # nobody reads the next token before every write of this one

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS * 3)
    assert not any(t.is_alive() for t in threads)

    for revision, results in enumerate(outcomes):
        assert len(results) == num_threads
        winners = [r for r in results if r[3]]
        assert len(winners) == 1, f"revision {revision}: {winners}"
        winner_index, winner_state, winner_token, _ = winners[0]
        assert winner_state == f"{revision}:{winner_index}".encode()
        # Every loser got the winner's state and token back, not its own.
        assert {(state, token) for _, state, token, _ in results} == {(winner_state, winner_token)}


def test_state_survives_a_client_reconnect(kv_factory: KvFactory, run_id: str) -> None:
    first = kv_factory()
    result = backend_for(first, run_id).set_state(b"kept")
    assert result is not None
    first.close()

    backend = backend_for(kv_factory(), run_id)
    assert backend.get_state() == (b"kept", result[1])
    updated = backend.set_state(b"next", result[1])
    assert updated is not None and updated[2]


def test_state_key_hangs_on_a_lease(kv_factory: KvFactory, run_id: str) -> None:
    kv = kv_factory()
    backend = backend_for(kv, run_id)
    assert backend.set_state(b"s") is not None
    stored = kv.get(backend.key)
    assert stored is not None and stored.lease_id != 0
    kv.revoke_lease(stored.lease_id)  # what expiry of an abandoned run does
    assert backend.get_state() is None
    # The backend notices its lease is gone and writes under a new one.
    assert backend.set_state(b"again") is not None
