"""EtcdStore (c10d Store on etcd) against both KV implementations, and per-round namespaces."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from elastic.rendezvous import EtcdStore, InMemoryEtcd, create_handler
from elastic.rendezvous.kv import KeyValueClient
from elastic.rendezvous.leases import LeaseKeeper
from tests.elastic.rendezvous.conftest import KvFactory

WAIT_SECONDS = 10.0


def store_for(kv: KeyValueClient, run_id: str, **kwargs: object) -> EtcdStore:
    return EtcdStore(kv, prefix=f"/test/{run_id}/store/", **kwargs)  # type: ignore[arg-type]


def test_set_get_and_multi_ops_round_trip(kv_factory: KvFactory, run_id: str) -> None:
    store = store_for(kv_factory(), run_id)
    store.set("a", "text")
    store.set("b", b"\x00bytes")
    assert store.get("a") == b"text"
    assert store.multi_get(["b", "a"]) == [b"\x00bytes", b"text"]
    store.multi_set(["c", "d"], ["1", b"2"])
    assert store.check(["a", "c", "d"]) and not store.check(["a", "missing"])
    assert store.num_keys() == 4
    assert store.delete_key("a") and not store.check(["a"])


def test_get_waits_for_a_key_set_later(kv_factory: KvFactory, run_id: str) -> None:
    reader, writer = store_for(kv_factory(), run_id), store_for(kv_factory(), run_id)
    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(reader.get("late")))
    thread.start()
    writer.set("late", "here")
    thread.join(timeout=WAIT_SECONDS)
    assert result == [b"here"]


def test_wait_raises_after_the_timeout(kv_factory: KvFactory, run_id: str) -> None:
    store = store_for(kv_factory(), run_id, timeout=timedelta(seconds=0.2))
    with pytest.raises(dist.DistStoreError, match="missing keys"):
        store.wait(["never"])
    with pytest.raises(dist.DistStoreError):
        store.get("never")


def test_add_is_atomic_across_clients(kv_factory: KvFactory, run_id: str) -> None:
    stores = [store_for(kv_factory(), run_id) for _ in range(4)]
    results: list[int] = []
    lock = threading.Lock()

    def add(store: EtcdStore) -> None:
        for _ in range(5):
            value = store.add("counter", 1)
            with lock:
                results.append(value)

    threads = [threading.Thread(target=add, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS)
    assert sorted(results) == list(range(1, 21))
    assert stores[0].add("counter", 0) == 20


def test_compare_set_follows_tcpstore_semantics(kv_factory: KvFactory, run_id: str) -> None:
    store = store_for(kv_factory(), run_id)
    assert store.compare_set("k", "expected", "new") == b"expected"  # absent, no match
    assert not store.check(["k"])
    assert store.compare_set("k", "", "first") == b"first"  # absent matches ""
    assert store.compare_set("k", "wrong", "x") == b"first"
    assert store.compare_set("k", "first", "second") == b"second"
    store.append("k", "+")
    assert store.get("k") == b"second+"


def test_store_works_behind_torch_prefix_store(kv_factory: KvFactory, run_id: str) -> None:
    # The Python store must stay referenced: the C++ wrapper does not keep it alive.
    store = store_for(kv_factory(), run_id)
    prefixed = dist.PrefixStore("job", store)
    prefixed.set("x", "1")
    assert prefixed.get("x") == b"1"
    assert prefixed.add("n", 3) == 3
    prefixed.wait(["x"], timedelta(seconds=1))


def test_store_keys_hang_on_the_lease(kv_factory: KvFactory, run_id: str) -> None:
    kv = kv_factory()
    lease = LeaseKeeper(kv, ttl_seconds=60)
    store = store_for(kv, run_id, lease=lease)
    store.set("k", "v")
    store.add("n", 1)
    stored = [kv.get(store.prefix + name) for name in ("k", "n")]
    assert all(item is not None and item.lease_id == lease.lease_id() for item in stored)


def test_rank_zero_deletes_the_store_of_earlier_rounds(run_id: str) -> None:
    memory = InMemoryEtcd()
    clients = [memory.client(), memory.client()]
    handlers = [
        create_handler(
            client,
            run_id=run_id,
            min_nodes=2,
            max_nodes=2,
            local_addr="127.0.0.1",
            last_call_timeout_seconds=0.5,
        )
        for client in clients
    ]
    rounds: dict[int, list[int]] = {0: [], 1: []}
    # Both nodes return from round one before either asks for the next round, as daemons do
    # (their workers ran on it). Without it, a node that re-joins at once opens round two
    # before its peer has read round one's result, and the peer then joins round two directly.
    round_one_read = threading.Barrier(2, timeout=60)

    def participate(index: int) -> None:
        for round_index in (0, 1):
            info = handlers[index].next_rendezvous()
            info.store.set(f"written-by-{info.rank}", "x")
            rounds[round_index].append(handlers[index].round)
            if round_index == 0:
                round_one_read.wait()

    threads = [threading.Thread(target=participate, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert not any(t.is_alive() for t in threads)
        first, second = rounds[0][0], rounds[1][0]
        assert rounds == {0: [first, first], 1: [second, second]} and second > first
        keys = handlers[0].keys
        names = {kv.key for kv in clients[0].get_prefix(keys.store_root)[0]}
        # Round two's keys exist; round one's were deleted when round two formed.
        assert keys.store(second) + "written-by-1" in names
        assert not any(name.startswith(keys.store(first)) for name in names)
    finally:
        for handler in handlers:
            handler.shutdown()
