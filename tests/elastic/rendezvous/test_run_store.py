"""RunStore: status, control requests and the bounded event log, on both KV implementations."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest

from elastic.rendezvous import EtcdStateError, RunStore
from tests.elastic.rendezvous.conftest import KvFactory

WAIT_SECONDS = 10.0


def test_status_round_trips_as_json(kv_factory: KvFactory, run_id: str) -> None:
    store = RunStore(kv_factory(), run_id=run_id, key_prefix="/test")
    assert store.get_status() is None
    store.put_status({"state": "training", "step": 12, "world_size": 2})
    assert store.get_status() == {"state": "training", "step": 12, "world_size": 2}


def test_corrupt_status_is_a_state_error(kv_factory: KvFactory, run_id: str) -> None:
    kv = kv_factory()
    store = RunStore(kv, run_id=run_id, key_prefix="/test")
    kv.put(store.keys.status, b"{not json")
    with pytest.raises(EtcdStateError, match="status"):
        store.get_status()


def test_put_control_merges_and_removes_keys(kv_factory: KvFactory, run_id: str) -> None:
    store = RunStore(kv_factory(), run_id=run_id, key_prefix="/test")
    assert store.get_control() == {}
    store.put_control({"scale": {"min_nodes": 2, "max_nodes": 4}})
    store.put_control({"paused": True, "rewind": {"to_step": 100}})
    assert store.get_control() == {
        "scale": {"min_nodes": 2, "max_nodes": 4},
        "paused": True,
        "rewind": {"to_step": 100},
        "seq": 2,
    }
    assert store.put_control({"rewind": None, "paused": False}) == {
        "scale": {"min_nodes": 2, "max_nodes": 4},
        "paused": False,
        "seq": 3,
    }


@pytest.mark.parametrize(
    "update",
    [
        {"scale": {"min_nodes": 3, "max_nodes": 2}},
        {"scale": {"min_nodes": 0, "max_nodes": 2}},
        {"paused": "yes"},
        {"rewind": {"to_step": -1}},
        {"nodes": 3},
    ],
)
def test_put_control_rejects_malformed_requests(
    kv_factory: KvFactory, run_id: str, update: dict[str, Any]
) -> None:
    store = RunStore(kv_factory(), run_id=run_id, key_prefix="/test")
    with pytest.raises(ValueError, match="control"):
        store.put_control(update)
    assert store.get_control() == {}


def test_concurrent_control_updates_are_all_kept(kv_factory: KvFactory, run_id: str) -> None:
    stores = [RunStore(kv_factory(), run_id=run_id, key_prefix="/test") for _ in range(2)]
    updates = [{"paused": True}, {"rewind": {"to_step": 5}}]
    threads = [
        threading.Thread(target=s.put_control, args=(u,))
        for s, u in zip(stores, updates, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS)
    assert stores[0].get_control() == {"paused": True, "rewind": {"to_step": 5}, "seq": 2}


def test_watch_control_reports_the_document_and_each_change(
    kv_factory: KvFactory, run_id: str
) -> None:
    store = RunStore(kv_factory(), run_id=run_id, key_prefix="/test")
    store.put_control({"paused": True})
    seen: queue.Queue[dict[str, Any]] = queue.Queue()
    watch = store.watch_control(seen.put)
    try:
        assert seen.get(timeout=WAIT_SECONDS) == {"paused": True, "seq": 1}
        store.put_control({"scale": {"min_nodes": 1, "max_nodes": 3}})
        assert seen.get(timeout=WAIT_SECONDS)["scale"] == {"min_nodes": 1, "max_nodes": 3}
    finally:
        watch.close()


def test_event_log_keeps_the_newest_entries(kv_factory: KvFactory, run_id: str) -> None:
    store = RunStore(
        kv_factory(), run_id=run_id, key_prefix="/test", max_events=5, clock=lambda: 7.0
    )
    for i in range(1, 9):
        assert store.append_event({"event": "round", "round": i}) == i
    events = store.events(limit=100)
    assert [e["round"] for e in events] == [4, 5, 6, 7, 8]
    assert events[-1] == {"event": "round", "round": 8, "seq": 8, "ts": 7.0}
    assert [e["seq"] for e in store.events(limit=2)] == [7, 8]


def test_last_event_seq_is_the_newest_events_seq(kv_factory: KvFactory, run_id: str) -> None:
    store = RunStore(kv_factory(), run_id=run_id, max_events=2)
    assert store.last_event_seq() == 0
    for _ in range(3):
        seq = store.append_event({"event": "x"})
    assert store.last_event_seq() == seq == 3


def test_latest_round_reads_the_groups_round_record(kv_factory: KvFactory, run_id: str) -> None:
    from elastic.rendezvous.records import RoundRecord

    kv = kv_factory()
    store = RunStore(kv, run_id=run_id)
    assert store.latest_round() is None
    record = RoundRecord(3, "closed", "a", 1, 2, ("a", "b"), "10.0.0.1", 29500)
    kv.put(store.keys.round, record.to_bytes())
    assert store.latest_round() == record
