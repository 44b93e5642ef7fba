"""Group's logic in seconds: rounds, regroup, aborts, node loss, control, status publishing.

Every test runs against the in-memory etcd and a real one (the same contract); daemons are
``Group`` objects in threads, no workers.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from daemon.config import DaemonConfig, NodesConfig
from daemon.group import Group, GroupUnavailable
from daemon.metrics import NodeMetrics
from daemon.workers import RoundAssignment
from elastic.protocol import Action
from elastic.rendezvous import EtcdConfig, InMemoryEtcd, KeyValueClient, RunStore, connect
from tests.support.etcd import EtcdServer
from tests.support.procs import wait_for

_runs = itertools.count()
WAIT_SECONDS = 20.0

GroupFactory = Callable[..., Group]


@pytest.fixture(params=["memory", "etcd"])
def make_kv(request: pytest.FixtureRequest) -> Iterator[Callable[[], KeyValueClient]]:
    if request.param == "memory":
        memory = InMemoryEtcd()
        yield memory.client
        return
    server: EtcdServer = request.getfixturevalue("etcd_server")
    config = EtcdConfig(endpoints=(server.endpoint,), connect_timeout_seconds=3.0)
    yield lambda: connect(config)


@pytest.fixture
def groups(make_kv: Callable[[], KeyValueClient]) -> Iterator[GroupFactory]:
    run_id = f"group{next(_runs)}"
    made: list[Group] = []

    def make(node: str, *, min_nodes: int = 1, max_nodes: int = 3, **nodes: Any) -> Group:
        config = DaemonConfig(
            run_id=run_id,
            nodes=NodesConfig(
                min=min_nodes,
                max=max_nodes,
                address="127.0.0.1",
                last_call_seconds=nodes.pop("last_call_seconds", 0.3),
                join_timeout_seconds=nodes.pop("join_timeout_seconds", 10.0),
            ),
            etcd=EtcdConfig(endpoints=("127.0.0.1:1",), ttl_seconds=2.0),
        )
        metrics = NodeMetrics(run_id=run_id, node=node, registry=CollectorRegistry())
        group = Group(config, node=node, endpoints=(), metrics=metrics, kv=make_kv())
        group.register({"node": node, "state": "starting"})
        group.publish_node_status({"node": node, "state": "joining"})
        made.append(group)
        return group

    yield make
    for group in made:
        group.close()


def join_all(members: list[Group]) -> list[RoundAssignment]:
    results: dict[int, RoundAssignment | BaseException | None] = {}

    def join(index: int) -> None:
        try:
            results[index] = members[index].join(restart_count=0, should_stop=lambda: False)
        except BaseException as exc:  # handed to the test
            results[index] = exc

    threads = [threading.Thread(target=join, args=(i,)) for i in range(len(members))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS)
    assert not any(t.is_alive() for t in threads), "a join did not return"
    out = [results[i] for i in range(len(members))]
    assert all(isinstance(a, RoundAssignment) for a in out), out
    return out  # type: ignore[return-value]


def active(group: Group, n: int) -> None:
    """Wait until ``group`` sees ``n`` active node records (publishing is asynchronous)."""
    wait_for(
        lambda: sum(1 for i in group.view.snapshot.nodes.values() if i["state"] == "active") == n,
        timeout_seconds=WAIT_SECONDS,
        what=f"{n} active nodes",
    )


def test_a_round_assigns_ranks_in_name_order_and_one_master(groups: GroupFactory) -> None:
    members = [groups(n, min_nodes=3, max_nodes=3) for n in ("c", "a", "b")]
    assignments = join_all(members)
    assert [a.group_rank for a in assignments] == [2, 0, 1]
    assert {a.round_id for a in assignments} == {assignments[0].round_id}
    assert {(a.master_addr, a.num_nodes) for a in assignments} == {("127.0.0.1", 3)}
    assert len({a.master_port for a in assignments}) == 1


def test_a_newcomer_makes_the_group_regroup_and_the_next_round_closes_without_last_call(
    groups: GroupFactory,
) -> None:
    a, b = groups("a", min_nodes=2), groups("b", min_nodes=2)
    a_first, b_first = join_all([a, b])
    assert a_first.num_nodes == b_first.num_nodes == 2
    c = groups("c", min_nodes=2, last_call_seconds=30.0)
    # c opens the next round: the running members see it and regroup.
    joined: list[RoundAssignment | None] = []
    thread = threading.Thread(
        target=lambda: joined.append(c.join(restart_count=0, should_stop=lambda: False))
    )
    thread.start()
    wait_for(lambda: a.regroup_wanted(a_first), timeout_seconds=WAIT_SECONDS, what="regroup")
    active(a, 3)
    # Every active node joins: the round closes at once, not after c's 30 s last call.
    a_next, b_next = join_all([a, b])
    thread.join(timeout=WAIT_SECONDS)
    assert joined and joined[0] is not None
    assert a_next.round_id == b_next.round_id == joined[0].round_id > a_first.round_id
    assert a_next.num_nodes == 3 and not a.regroup_wanted(a_next)


def test_a_full_group_does_not_regroup_for_a_newcomer(groups: GroupFactory) -> None:
    a, b = groups("a", min_nodes=2, max_nodes=2), groups("b", min_nodes=2, max_nodes=2)
    a_round, _ = join_all([a, b])
    c = groups("c", min_nodes=2, max_nodes=2, join_timeout_seconds=0.5)
    with pytest.raises(GroupUnavailable):
        c.join(restart_count=0, should_stop=lambda: False)
    assert not a.regroup_wanted(a_round)


def test_an_abort_reaches_every_member_of_that_round_only(groups: GroupFactory) -> None:
    a, b = groups("a", min_nodes=2), groups("b", min_nodes=2)
    a_round, b_round = join_all([a, b])
    a.announce_failure(a_round, "worker 0 exited 1")
    assert a.peer_failed(a_round)
    wait_for(lambda: b.peer_failed(b_round), timeout_seconds=WAIT_SECONDS, what="abort seen")
    a_next, b_next = join_all([a, b])
    assert not a.peer_failed(a_next) and not b.peer_failed(b_next)


def test_a_member_whose_lease_ends_is_lost_but_a_draining_one_is_not(
    groups: GroupFactory,
) -> None:
    a, b, c = (groups(n, min_nodes=1) for n in ("a", "b", "c"))
    for g in (a, b, c):
        active(g, 3)
    a_round, _, _ = join_all([a, b, c])
    b.publish_node_status({"node": "b", "state": "draining"})
    wait_for(
        lambda: a.view.snapshot.nodes.get("b", {}).get("state") == "draining",
        timeout_seconds=WAIT_SECONDS,
        what="b draining",
    )
    b.leave()
    wait_for(lambda: "b" not in a.view.snapshot.nodes, timeout_seconds=WAIT_SECONDS, what="b gone")
    assert not a.member_lost(a_round)
    c.lease.revoke()  # as a lease that expired: no graceful state first
    wait_for(lambda: a.member_lost(a_round), timeout_seconds=WAIT_SECONDS, what="c lost")


def test_control_requests_relay_once_and_rewind_only_on_rank_0(groups: GroupFactory) -> None:
    a, b = groups("a", min_nodes=2), groups("b", min_nodes=2)
    join_all([a, b])
    store = RunStore(a.kv, run_id=a.config.run_id, key_prefix=a.keys.key_prefix)
    store.put_control({"paused": True, "rewind": {"to_step": 7}})
    wait_for(lambda: a.view.snapshot.control.get("paused"), timeout_seconds=WAIT_SECONDS, what="p")
    wait_for(lambda: b.view.snapshot.control.get("paused"), timeout_seconds=WAIT_SECONDS, what="p")
    assert a.take_control() == [
        {"action": Action.PAUSE},
        {"action": Action.REWIND, "to_step": 7},
    ]
    assert b.take_control() == [{"action": Action.PAUSE}]
    assert a.take_control() == [] and b.take_control() == []
    wait_for(
        lambda: "rewind" not in b.view.snapshot.control,
        timeout_seconds=WAIT_SECONDS,
        what="the rewind consumed",
    )


def test_scale_bounds_change_makes_the_round_regroup_under_the_new_bounds(
    groups: GroupFactory,
) -> None:
    a = groups("a", min_nodes=1, max_nodes=2)
    (first,) = join_all([a])
    assert not a.regroup_wanted(first)
    RunStore(a.kv, run_id=a.config.run_id, key_prefix=a.keys.key_prefix).put_control(
        {"scale": {"min_nodes": 1, "max_nodes": 4}}
    )
    wait_for(lambda: a.regroup_wanted(first), timeout_seconds=WAIT_SECONDS, what="regroup")
    (second,) = join_all([a])
    assert second.round_id > first.round_id and not a.regroup_wanted(second)


def test_running_nodes_write_their_record_only_when_it_changes(groups: GroupFactory) -> None:
    a = groups("a")
    join_all([a])
    active(a, 1)
    _, before = a.kv.get_prefix(a.keys.nodes)
    writes: list[str] = []
    watch = a.kv.watch_prefix(
        a.keys.node("a"),
        start_revision=before + 1,
        on_events=lambda events: writes.extend(e.key for e in events),
        on_error=lambda exc: None,
    )
    try:
        for step in range(50):  # what the supervisor's ticks hand over while training
            a.set_status({"node": "a", "state": "running", "last_step": step})
        a.publish_node_status({"node": "a", "state": "running", "last_step": 50})
        a.set_status({"node": "a", "state": "running", "last_failure": {"returncode": 1}})
        wait_for(
            lambda: "last_failure" in a.view.snapshot.nodes["a"],
            timeout_seconds=WAIT_SECONDS,
            what="the failure published",
        )
    finally:
        watch.cancel()
    assert writes == [a.keys.node("a")]  # the failure, nothing for the ticks


def test_a_new_goodput_trend_is_written_once_and_its_growth_is_not(groups: GroupFactory) -> None:
    a = groups("a")
    join_all([a])
    active(a, 1)

    def status(paused_seconds: float, rates: dict[str, float]) -> dict[str, Any]:
        ledger = {"badput_seconds": {"paused": paused_seconds}, "rates": rates}
        return {"node": "a", "state": "running", "goodput": ledger}

    a.set_status(status(0.0, {"productive": 1.0}))
    a.set_status(status(0.0, {"paused": 1.0}))
    wait_for(
        lambda: a.view.snapshot.nodes["a"].get("goodput", {}).get("rates") == {"paused": 1.0},
        timeout_seconds=WAIT_SECONDS,
        what="the paused trend published",
    )
    _, before = a.kv.get_prefix(a.keys.nodes)
    for seconds in range(1, 20):  # the paused bucket grows: readers extrapolate it
        a.set_status(status(float(seconds), {"paused": 1.0}))
    a.set_status(status(20.0, {"productive": 1.0}))
    wait_for(
        lambda: a.view.snapshot.nodes["a"]["goodput"]["rates"] == {"productive": 1.0},
        timeout_seconds=WAIT_SECONDS,
        what="the training trend published",
    )
    _, after = a.kv.get_prefix(a.keys.nodes)
    assert after == before + 1
    assert a.view.snapshot.nodes["a"]["goodput"]["badput_seconds"] == {"paused": 20.0}


def test_a_restarted_daemon_never_takes_a_round_from_before_it_started(
    groups: GroupFactory,
) -> None:
    a = groups("a", min_nodes=1, max_nodes=2)
    (first,) = join_all([a])
    a.close()
    again = groups("a", min_nodes=1, max_nodes=2)
    (second,) = join_all([again])
    assert second.round_id > first.round_id


def test_events_leave_the_callers_thread_at_once_and_reach_etcd_in_order(
    groups: GroupFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = groups("a")
    gate = threading.Event()
    append = a.store.append_event

    def slow_append(record: dict[str, Any]) -> int:
        gate.wait(WAIT_SECONDS)  # an etcd that does not answer, until the gate opens
        return append(record)

    monkeypatch.setattr(a.store, "append_event", slow_append)
    started = time.monotonic()
    for seq in range(5):  # what the workers' output relay hands over
        a.event({"event": "checkpoint_commit", "step": seq})
    assert time.monotonic() - started < 1.0  # the relay never waits for etcd
    gate.set()
    wait_for(
        lambda: (
            [e["step"] for e in a.store.events() if e["event"] == "checkpoint_commit"]
            == [0, 1, 2, 3, 4]
        ),
        timeout_seconds=WAIT_SECONDS,
        what="the five events, in order",
    )


def test_the_step_lines_numbers_go_to_the_run_status_not_the_node_record(
    groups: GroupFactory,
) -> None:
    a = groups("a")
    join_all([a])
    active(a, 1)
    train = {"loss": 2.5, "tokens_per_s": 1200.0, "step": 7, "time_unix": 1.0}
    a.publish_node_status({"node": "a", "state": "running", "last_step": 7, "train": train})
    wait_for(
        lambda: (a.store.get_status() or {}).get("train") == train,
        timeout_seconds=WAIT_SECONDS,
        what="the run status with the step line's numbers",
    )
    assert a.view.snapshot.nodes["a"]["state"] == "active"
    assert "train" not in a.view.snapshot.nodes["a"]  # every node watches the records
