"""EtcdRendezvousHandler: torch's handler interface on the round protocol (memory and real etcd).

Latency tests give the last call far more time than they allow, so a round that forms only
because the last call ran out fails the time bound.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
)

from elastic.rendezvous import InMemoryEtcd, create_handler
from elastic.rendezvous.handler import CLOSED_KEY, EtcdRendezvousHandler
from elastic.rendezvous.kv import KeyValueClient
from elastic.rendezvous.records import load
from elastic.rendezvous.store import EtcdStore
from elastic.rendezvous.torchrun import config_from_params, handler_factory
from tests.elastic.rendezvous.conftest import KvFactory
from tests.support.etcd import EtcdServer

WAIT_SECONDS = 60.0
LAST_CALL_SECONDS = 30.0
FAST_SECONDS = 8.0  # far below the last call


def make(kv: KeyValueClient, run_id: str, **overrides: Any) -> EtcdRendezvousHandler:
    settings: dict[str, Any] = {
        "min_nodes": 2,
        "max_nodes": 3,
        "local_addr": "127.0.0.1",
        "last_call_timeout_seconds": 0.5,
        "join_timeout_seconds": WAIT_SECONDS,
    }
    settings.update(overrides)
    return create_handler(kv, run_id=run_id, **settings)


def join_all(handlers: list[EtcdRendezvousHandler]) -> tuple[list[RendezvousInfo], float]:
    """Every handler's next round (concurrently) and the seconds until the last one had it."""
    infos: dict[int, RendezvousInfo] = {}
    errors: list[BaseException] = []

    def join(index: int) -> None:
        try:
            infos[index] = handlers[index].next_rendezvous()
        except BaseException as exc:  # handed to the test, which asserts on it
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(len(handlers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=LAST_CALL_SECONDS + 30)
    assert errors == [] and len(infos) == len(handlers), errors
    return [infos[i] for i in range(len(handlers))], time.monotonic() - started


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT_SECONDS} s for {what}"
        time.sleep(0.02)


def test_a_late_joiner_gets_a_round_with_the_current_master_address(run_id: str) -> None:
    memory = InMemoryEtcd()
    handlers = [make(memory.client(), run_id) for _ in range(3)]
    infos: dict[int, list[RendezvousInfo]] = {0: [], 1: [], 2: []}
    errors: list[BaseException] = []

    def founder(index: int) -> None:
        try:
            infos[index].append(handlers[index].next_rendezvous())
            deadline = time.monotonic() + WAIT_SECONDS
            while handlers[index].num_nodes_waiting() == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            infos[index].append(handlers[index].next_rendezvous())
        except BaseException as exc:
            errors.append(exc)

    def latecomer() -> None:
        try:
            infos[2].append(handlers[2].next_rendezvous())
        except BaseException as exc:
            errors.append(exc)

    founders = [threading.Thread(target=founder, args=(i,), daemon=True) for i in (0, 1)]
    for thread in founders:
        thread.start()
    wait_until(lambda: infos[0] and infos[1], "the founders' first round")
    late = threading.Thread(target=latecomer, daemon=True)
    late.start()
    for thread in [*founders, late]:
        thread.join(timeout=WAIT_SECONDS)
    try:
        assert errors == [] and not any(t.is_alive() for t in [*founders, late])
        assert [len(infos[i]) for i in (0, 1, 2)] == [2, 2, 1]
        assert {i.world_size for i in (infos[0][0], infos[1][0])} == {2}
        final = [infos[0][1], infos[1][1], infos[2][0]]
        assert sorted(i.rank for i in final) == [0, 1, 2]
        assert {i.world_size for i in final} == {3}
        # Everyone bootstraps from the one address rank 0 gave, the newcomer included.
        addresses = {
            (i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port)
            for i in final
            if i.bootstrap_store_info is not None
        }
        assert len(addresses) == 1 and next(iter(addresses))[0] == "127.0.0.1"
        assert len({h.round for h in handlers}) == 1
    finally:
        for h in handlers:
            h.shutdown()


def test_ranks_follow_node_names_and_rank_0_gives_the_bootstrap_address(
    kv_factory: KvFactory, run_id: str
) -> None:
    handlers = [
        make(kv_factory(), run_id, min_nodes=2, max_nodes=2, node_name=name)
        for name in ("node-b", "node-a")
    ]
    try:
        infos, _ = join_all(handlers)
        assert [(i.rank, i.world_size) for i in infos] == [(1, 2), (0, 2)]
        bootstrap = [i.bootstrap_store_info for i in infos]
        assert bootstrap[0] is not None and bootstrap[0] == bootstrap[1]
        addr, port = bootstrap[0].master_addr, bootstrap[0].master_port
        assert addr == "127.0.0.1" and 0 < port < 65536
        round_id = handlers[0].round
        assert round_id == handlers[1].round >= 1
        for info in infos:
            assert isinstance(info.store, EtcdStore)
            assert info.store.prefix == handlers[0].keys.store(round_id)
        infos[0].store.set("from-b", "x")
        assert infos[1].store.get("from-b") == b"x"  # one store per round, shared
        assert [h.num_nodes_waiting() for h in handlers] == [0, 0]
        assert {h.get_backend() for h in handlers} == {"etcd3"}
        assert {h.get_run_id() for h in handlers} == {run_id}
        assert not any(h.use_agent_store for h in handlers)
    finally:
        for h in handlers:
            h.shutdown()


def test_a_worker_restart_reforms_the_group_without_waiting_for_the_last_call(
    kv_factory: KvFactory, run_id: str
) -> None:
    handlers = [
        make(kv_factory(), run_id, min_nodes=2, max_nodes=2, last_call_timeout_seconds=30)
        for _ in range(2)
    ]
    try:
        join_all(handlers)
        assert [h.num_nodes_waiting() for h in handlers] == [0, 0]
        restarted: list[RendezvousInfo] = []
        thread = threading.Thread(
            target=lambda: restarted.append(handlers[0].next_rendezvous()), daemon=True
        )
        started = time.monotonic()
        thread.start()  # node 0's workers failed: its agent re-rendezvous
        wait_until(lambda: handlers[1].num_nodes_waiting() == 1, "node 1 to see a newer round")
        second = handlers[1].next_rendezvous()
        thread.join(timeout=WAIT_SECONDS)
        seconds = time.monotonic() - started
        assert restarted and seconds < FAST_SECONDS
        assert sorted([restarted[0].rank, second.rank]) == [0, 1]
        assert {restarted[0].world_size, second.world_size} == {2}
        assert handlers[0].round == handlers[1].round > 1
        assert [h.num_nodes_waiting() for h in handlers] == [0, 0]
    finally:
        for h in handlers:
            h.shutdown()


def test_the_first_round_below_max_nodes_waits_for_the_last_call(
    kv_factory: KvFactory, run_id: str
) -> None:
    handlers = [
        make(kv_factory(), run_id, min_nodes=1, max_nodes=3, last_call_timeout_seconds=1.5)
        for _ in range(2)
    ]
    try:
        infos, seconds = join_all(handlers)
        # Round 1: peers may not have registered yet, so only max_nodes or the last call end it.
        assert seconds >= 1.5
        assert {i.world_size for i in infos} == {2}
    finally:
        for h in handlers:
            h.shutdown()


def test_a_node_that_leaves_does_not_hold_up_the_next_round_of_the_others(
    kv_factory: KvFactory, run_id: str
) -> None:
    handlers = [
        make(kv_factory(), run_id, min_nodes=1, max_nodes=3, last_call_timeout_seconds=30)
        for _ in range(3)
    ]
    try:
        first, _ = join_all(handlers)  # three of max three: closed at once
        assert {i.world_size for i in first} == {3}
        leaving = handlers.pop()
        assert leaving.leave()
        assert not handlers[0].is_closed()  # leaving is not closing the run
        second, seconds = join_all(handlers)
        assert seconds < FAST_SECONDS  # not at the last call
        assert {i.world_size for i in second} == {2}
        assert sorted(i.rank for i in second) == [0, 1]
        assert handlers[0].round == handlers[1].round == leaving.round + 1
    finally:
        for h in handlers:
            h.shutdown()


def test_an_agent_that_shuts_down_closes_the_run_for_the_others(
    kv_factory: KvFactory, run_id: str
) -> None:
    other, finished = make(kv_factory(), run_id), make(kv_factory(), run_id)
    try:
        assert not other.is_closed()
        assert finished.shutdown()  # torch's contract: an agent that is done closes the run
        assert finished.is_closed()
        wait_until(other.is_closed, "the closed marker to reach the other node")
        with pytest.raises(RendezvousClosedError):
            other.next_rendezvous()
        with pytest.raises(RendezvousClosedError):
            finished.next_rendezvous()
    finally:
        other.shutdown()


def test_a_node_already_waiting_is_released_when_another_closes_the_run(
    kv_factory: KvFactory, run_id: str
) -> None:
    waiting, closer = make(kv_factory(), run_id), make(kv_factory(), run_id)
    errors: list[BaseException] = []

    def wait_for_round() -> None:
        try:
            waiting.next_rendezvous()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait_for_round, daemon=True)
    thread.start()
    try:
        wait_until(lambda: waiting.view.snapshot.round is not None, "the round to open")
        started = time.monotonic()
        closer.set_closed()
        thread.join(timeout=WAIT_SECONDS)
        assert time.monotonic() - started < FAST_SECONDS
        assert len(errors) == 1 and isinstance(errors[0], RendezvousClosedError)
    finally:
        closer.shutdown()
        waiting.shutdown()


def test_shutdown_removes_the_node_record_and_every_value_is_a_json_record(
    kv_factory: KvFactory, run_id: str
) -> None:
    reader = kv_factory()
    handlers = [make(kv_factory(), run_id, min_nodes=2, max_nodes=2) for _ in range(2)]
    join_all(handlers)
    keys = handlers[0].keys
    nodes = {value.key for value in reader.get_prefix(keys.nodes)[0]}
    assert nodes == {keys.node(h.name) for h in handlers}
    for h in handlers:
        assert h.shutdown()
    assert reader.get_prefix(keys.nodes)[0] == []
    assert reader.get(keys.root + CLOSED_KEY) is not None
    stored, _ = reader.get_prefix(keys.root)
    # Nothing but versioned JSON records outside the agents' c10d store: nothing to unpickle.
    for value in stored:
        if not value.key.startswith(keys.store_root):
            load(value.key, value.value)


def test_a_node_beyond_max_nodes_times_out_with_torchs_timeout_error(
    kv_factory: KvFactory, run_id: str
) -> None:
    member = make(kv_factory(), run_id, min_nodes=1, max_nodes=1)
    extra = make(kv_factory(), run_id, min_nodes=1, max_nodes=1, join_timeout_seconds=1.0)
    try:
        assert member.next_rendezvous().world_size == 1
        started = time.monotonic()
        with pytest.raises(RendezvousTimeoutError, match="no round formed within 1 s"):
            extra.next_rendezvous()
        assert time.monotonic() - started < FAST_SECONDS
        assert member.num_nodes_waiting() == 0  # the group is full: no re-rendezvous for it
    finally:
        extra.shutdown()
        member.shutdown()


def test_torchrun_parameters_with_torchs_heartbeat_knobs_give_a_working_handler(
    etcd_server: EtcdServer, run_id: str
) -> None:
    params = RendezvousParameters(
        "etcd3",
        etcd_server.endpoint,
        run_id,
        1,
        1,
        local_addr="127.0.0.1",
        last_call_timeout="0.5",
        node_ttl_seconds="3",
        keep_alive_interval="1",  # accepted and ignored: node leases, no heartbeats
        keep_alive_max_attempt="3",
        heartbeat_timeout="5",
        close_timeout="5",
        timeout="900",
    )
    config = config_from_params(params)
    assert (config.ttl_seconds, config.state_ttl_seconds) == (3.0, 7200.0)  # node lease, store
    handler = handler_factory()(params)
    try:
        assert isinstance(handler, EtcdRendezvousHandler)
        info = handler.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
        assert handler.get_run_id() == run_id
    finally:
        assert handler.shutdown()
