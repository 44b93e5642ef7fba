"""The round protocol (RoundJoiner): open by CAS, join by one put, close by CAS, take over.

Every test runs against the in-memory etcd and a real one (``kv_factory``); each participant
has its own client, lease, node record and GroupView, as separate daemons would. Joins run in
threads with bounded waits; the protocol's one timer (the last call) runs on a fake clock.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from elastic.rendezvous import KeyValueClient, RunKeys
from elastic.rendezvous.errors import RoundTimeout
from elastic.rendezvous.kv import Put
from elastic.rendezvous.records import JoinRecord, RoundRecord, encode_node
from elastic.rendezvous.rounds import JoinSettings, RoundJoiner
from elastic.rendezvous.view import GroupView, Snapshot
from tests.elastic.rendezvous.conftest import KvFactory

WAIT_SECONDS = 20.0
PREFIX = "/elasticd-rounds"
LEASE_TTL_SECONDS = 60
Result = RoundRecord | BaseException | None


def active(snap: Snapshot) -> set[str]:
    """The daemon's notion of expected nodes: live and active."""
    return {name for name, info in snap.nodes.items() if info.get("state") == "active"}


@dataclasses.dataclass
class Node:
    name: str
    addr: str
    port: int
    kv: KeyValueClient
    lease: int
    view: GroupView
    joiner: RoundJoiner


class Cluster:
    """Participants of one run; closes their views and revokes their leases at the end."""

    def __init__(self, kv_factory: KvFactory, keys: RunKeys) -> None:
        self.kv_factory = kv_factory
        self.keys = keys
        self.kv = kv_factory()  # the test's own client: setup, reads, revisions
        self.nodes: list[Node] = []
        self.leases: list[int] = []
        self.clock: Callable[[], float] = time.monotonic  # every joiner's, from add() on

    def lease(self) -> int:
        self.leases.append(self.kv.grant_lease(LEASE_TTL_SECONDS))
        return self.leases[-1]

    def register(self, name: str, *, state: str = "active") -> int:
        """A node record under a new lease, as the daemon's NodeLease writes it."""
        lease = self.lease()
        self.kv.put(self.keys.node(name), encode_node({"state": state}), lease_id=lease)
        return lease

    def add(self, name: str) -> Node:
        """A participant: its own client, lease, node record, GroupView and RoundJoiner."""
        kv = self.kv_factory()
        lease = kv.grant_lease(LEASE_TTL_SECONDS)
        self.leases.append(lease)
        kv.put(self.keys.node(name), encode_node({"state": "active"}), lease_id=lease)
        view = GroupView(kv, self.keys).start()
        addr, port = f"{name}.example", 20000 + len(self.nodes)
        joiner = RoundJoiner(
            kv,
            self.keys,
            view,
            name=name,
            addr=addr,
            lease_id=lambda: lease,
            port=lambda: port,
            expected=active,
            clock=self.clock,
        )
        self.nodes.append(Node(name, addr, port, kv, lease, view, joiner))
        return self.nodes[-1]

    def join(
        self,
        nodes: Sequence[Node],
        settings: JoinSettings,
        *,
        after_round: int = 0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Callable[[], dict[str, Result]]:
        """Start ``join`` on every node at once; the result waits for them (bounded)."""
        results: dict[str, Result] = {}

        def run(node: Node) -> None:
            try:
                results[node.name] = node.joiner.join(
                    settings, after_round=after_round, should_stop=should_stop
                )
            except BaseException as exc:  # handed to the test, which asserts on it
                results[node.name] = exc

        threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in nodes]
        for thread in threads:
            thread.start()

        def wait() -> dict[str, Result]:
            for thread in threads:
                thread.join(timeout=WAIT_SECONDS)
            assert not any(t.is_alive() for t in threads), "a join did not return in time"
            return results

        return wait

    def revision(self) -> int:
        """etcd's current revision, read without writing."""
        return self.kv.get_prefix(self.keys.round)[1]

    def joined(self, round_: int) -> set[str]:
        return {kv.key.rsplit("/", 1)[-1] for kv in self.kv.get_prefix(self.keys.joins(round_))[0]}

    def round(self) -> RoundRecord | None:
        snap = self.nodes[0].view.snapshot if self.nodes else None
        return snap.round if snap is not None else None

    def put_round(self, record: RoundRecord) -> None:
        self.kv.put(self.keys.round, record.to_bytes())

    def close(self) -> None:
        for node in self.nodes:
            node.view.close()
        for lease in self.leases:
            self.kv.revoke_lease(lease)


@pytest.fixture
def cluster(kv_factory: KvFactory, run_id: str) -> Iterator[Cluster]:
    group = Cluster(kv_factory, RunKeys(PREFIX, run_id))
    try:
        yield group
    finally:
        group.close()


def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Bounded wait for something no watch of ours carries (e.g. keys under ``joins/``)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_SECONDS} s"
        time.sleep(0.01)


def closed(round_: int, *participants: str, max_nodes: int = 8) -> RoundRecord:
    names = tuple(sorted(participants))
    return RoundRecord(
        round=round_,
        state="closed",
        opener=names[0],
        min_nodes=1,
        max_nodes=max_nodes,
        participants=names,
        master_addr=f"{names[0]}.example",
        master_port=20000,
    )


def settings(min_nodes: int, max_nodes: int, **overrides: float) -> JoinSettings:
    values = {"last_call_seconds": 600.0, "timeout_seconds": WAIT_SECONDS, **overrides}
    return JoinSettings(min_nodes=min_nodes, max_nodes=max_nodes, **values)


def only_record(results: dict[str, Result]) -> RoundRecord:
    """The one round every join returned (each must have returned a round)."""
    records = set(results.values())
    assert len(records) == 1, f"not one round: {results}"
    record = records.pop()
    assert isinstance(record, RoundRecord), record
    return record


# ---------------------------------------------------------------------------- forming
@pytest.mark.parametrize("num_nodes", [3, 8])
def test_a_round_of_n_forms_once_ranked_by_name_with_rank_0_as_master_in_n_plus_2_writes(
    cluster: Cluster, num_nodes: int
) -> None:
    # Joining in reverse name order: ranks must follow names, not arrival.
    nodes = [cluster.add(f"node-{i:02d}") for i in reversed(range(num_nodes))]
    before = cluster.revision()
    results = cluster.join(nodes, settings(num_nodes, num_nodes))()
    writes = cluster.revision() - before

    record = only_record(results)
    names = sorted(n.name for n in nodes)
    assert record.round == 1 and record.closed
    assert record.participants == tuple(names)
    assert [record.rank_of(name) for name in names] == list(range(num_nodes))
    rank0 = next(n for n in nodes if n.name == names[0])
    assert (record.master_addr, record.master_port) == (rank0.addr, rank0.port)
    assert all(n.view.snapshot.highest_round == 1 for n in nodes)  # formed once
    # N joins + the open + the close; lost compare-and-sets write nothing.
    assert writes <= num_nodes + 4, f"{writes} etcd writes for a round of {num_nodes}"


def test_a_round_closes_as_soon_as_max_nodes_joined(cluster: Cluster) -> None:
    nodes = [cluster.add(f"node-{i}") for i in range(3)]
    started = time.monotonic()
    results = cluster.join(nodes, settings(1, 3, last_call_seconds=600.0))()
    assert only_record(results).participants == ("node-0", "node-1", "node-2")
    assert time.monotonic() - started < WAIT_SECONDS  # not the 600 s last call


class FakeClock:
    """The joiners' clock: frozen until the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_round_one_waits_for_the_last_call_even_when_every_node_joined(cluster: Cluster) -> None:
    """In round 1 peers may not have registered yet: min_nodes starts the last call and the
    round closes when it ends, not when the nodes seen so far have all joined. With the clock
    frozen the last call cannot end, however long the test takes to look."""
    last_call_seconds = 30.0
    clock = cluster.clock = FakeClock()
    nodes = [cluster.add(f"node-{i}") for i in range(3)]
    bounds = settings(2, 5, last_call_seconds=last_call_seconds, timeout_seconds=1e6)
    wait = cluster.join(nodes, bounds)
    eventually(lambda: cluster.joined(1) == {"node-0", "node-1", "node-2"}, "all three joined")
    still = cluster.round()
    assert still is not None and not still.closed, "closed before the last call"
    late = nodes[0].view.wait_for(lambda s: s.round is not None and s.round.closed, 0.5)
    assert late is None, "closed with the last call still running"

    # Past the last call; again in case the opener first saw min_nodes after an advance.
    for _ in range(10):
        clock.now += last_call_seconds + 1
        for node in nodes:
            node.view.poke()
        if nodes[0].view.wait_for(lambda s: s.round is not None and s.round.closed, 2.0):
            break
    record = only_record(wait())
    assert record.participants == ("node-0", "node-1", "node-2")


def test_a_later_round_closes_as_soon_as_every_expected_node_joined(cluster: Cluster) -> None:
    cluster.put_round(closed(1, "node-a", "node-b"))
    cluster.register("node-d", state="draining")  # live but leaving: not expected
    nodes = [cluster.add(name) for name in ("node-a", "node-b", "node-c")]
    started = time.monotonic()
    results = cluster.join(nodes, settings(2, 8, last_call_seconds=600.0), after_round=1)()
    record = only_record(results)
    assert (record.round, record.participants) == (2, ("node-a", "node-b", "node-c"))
    assert time.monotonic() - started < WAIT_SECONDS  # not the 600 s last call


def test_a_newcomer_to_a_round_below_max_opens_the_next_and_members_see_it(
    cluster: Cluster,
) -> None:
    members = [cluster.add("node-a"), cluster.add("node-b")]
    cluster.put_round(closed(1, "node-a", "node-b", max_nodes=3))
    newcomer = cluster.add("node-c")
    bounds = settings(2, 3, last_call_seconds=600.0)
    wait_newcomer = cluster.join([newcomer], bounds)

    for member in members:  # what makes a running member regroup at its next step
        snap = member.view.wait_for(
            lambda s: s.round is not None and s.round.round == 2, WAIT_SECONDS
        )
        assert snap is not None and snap.round is not None
        assert (snap.round.state, snap.round.opener, snap.highest_round) == ("open", "node-c", 2)
    results = cluster.join(members, bounds, after_round=1)()
    results.update(wait_newcomer())
    record = only_record(results)
    assert (record.round, record.participants) == (2, ("node-a", "node-b", "node-c"))


def test_a_newcomer_to_a_full_round_opens_none_and_times_out_without_writing(
    cluster: Cluster,
) -> None:
    for member in ("node-a", "node-b"):
        cluster.add(member)
    cluster.put_round(closed(1, "node-a", "node-b", max_nodes=2))
    newcomer = cluster.add("node-c")
    before = cluster.revision()
    result = cluster.join([newcomer], settings(1, 2, timeout_seconds=0.3))()["node-c"]
    assert isinstance(result, RoundTimeout)
    assert cluster.revision() == before
    assert newcomer.view.snapshot.round == closed(1, "node-a", "node-b", max_nodes=2)


# ---------------------------------------------------------------------------- failures
def test_when_the_opener_dies_a_participant_takes_over_and_closes_without_it(
    cluster: Cluster,
) -> None:
    ghost_lease = cluster.register("node-0")
    join = JoinRecord(name="node-0", addr="node-0.example", port=29400)
    cluster.kv.put(cluster.keys.joins(1) + "node-0", join.to_bytes(), lease_id=ghost_lease)
    opened = RoundRecord(round=1, state="open", opener="node-0", min_nodes=2, max_nodes=3)
    assert cluster.kv.commit(
        cluster.keys.round,
        expected_mod_revision=0,
        ops=[Put(cluster.keys.round, opened.to_bytes())],
    ).succeeded
    nodes = [cluster.add(f"node-{i}") for i in (1, 2, 3)]
    wait = cluster.join(nodes, settings(2, 3))
    eventually(lambda: len(cluster.joined(1)) == 4, "every participant joined")
    record = cluster.round()
    assert record is not None and not record.closed  # the opener is alive and does not close

    cluster.kv.revoke_lease(ghost_lease)  # node record and join key go with the lease
    record = only_record(wait())
    assert (record.round, record.participants) == (1, ("node-1", "node-2", "node-3"))
    assert record.opener in record.participants
    assert (record.master_addr, record.master_port) == (nodes[0].addr, nodes[0].port)


def test_a_join_that_times_out_raises_round_timeout_and_withdraws_its_key(
    cluster: Cluster,
) -> None:
    node = cluster.add("node-a")
    result = cluster.join([node], settings(2, 2, timeout_seconds=0.3))()["node-a"]
    assert isinstance(result, RoundTimeout)
    assert "min_nodes 2" in str(result)
    assert cluster.joined(1) == set()


def test_should_stop_ends_a_join_with_none_and_withdraws_its_key(cluster: Cluster) -> None:
    node = cluster.add("node-a")
    stop = threading.Event()
    result: list[Result] = []
    thread = threading.Thread(
        target=lambda: result.append(
            node.joiner.join(settings(2, 2), after_round=0, should_stop=stop.is_set)
        ),
        daemon=True,
    )
    thread.start()
    eventually(lambda: cluster.joined(1) == {"node-a"}, "node-a joined")
    stop.set()
    node.view.poke()  # what the daemon does when it sets the stop flag
    thread.join(timeout=WAIT_SECONDS)
    assert not thread.is_alive() and result == [None]
    assert cluster.joined(1) == set()


# ---------------------------------------------------------------------------- the close
def test_the_close_deletes_earlier_rounds_joins_aborts_and_stores(cluster: Cluster) -> None:
    keys, kv = cluster.keys, cluster.kv
    cluster.put_round(closed(1, "node-a", "node-b"))
    earlier = [keys.joins(1) + "node-a", keys.abort(1), keys.store(1) + "rank0"]
    for key in earlier:
        kv.put(key, b"{}")
    nodes = [cluster.add("node-a"), cluster.add("node-b")]
    record = only_record(cluster.join(nodes, settings(2, 2), after_round=1)())
    assert record.round == 2
    assert [key for key in earlier if kv.get(key) is not None] == []
    assert cluster.joined(2) == {"node-a", "node-b"}  # this round's own keys stay


@pytest.mark.parametrize("remember", [True, False], ids=["remembered", "not-remembered"])
def test_over_max_nodes_the_previous_rounds_members_come_first(
    cluster: Cluster, remember: bool
) -> None:
    """node-c joined first, but node-a and node-b trained in round 1: with max_nodes 2 they
    form round 2 (without ``remember``, join order decides)."""
    keys, kv = cluster.keys, cluster.kv
    previous = closed(1, "node-a", "node-b")
    cluster.put_round(previous)
    for name in ("node-c", "node-b"):  # in this order, before node-a
        lease = cluster.register(name)
        join = JoinRecord(name=name, addr=f"{name}.example", port=29400)
        kv.put(keys.joins(2) + name, join.to_bytes(), lease_id=lease)
    opener = cluster.add("node-a")
    round_kv = kv.get(keys.round)
    assert round_kv is not None
    opened = RoundRecord(round=2, state="open", opener="node-a", min_nodes=1, max_nodes=2)
    assert kv.commit(
        keys.round,
        expected_mod_revision=round_kv.mod_revision,
        ops=[Put(keys.round, opened.to_bytes())],
    ).succeeded
    if remember:
        opener.joiner.remember(previous)

    def left_out() -> bool:  # a closed round 2 without node-a never ends node-a's join
        record = opener.view.snapshot.round
        return record is not None and record.closed and "node-a" not in record.participants

    result = cluster.join([opener], settings(1, 2), after_round=1, should_stop=left_out)()
    record = opener.view.snapshot.round
    assert record is not None and record.round == 2
    if remember:
        assert result["node-a"] == record
        assert record.participants == ("node-a", "node-b")
    else:
        assert result["node-a"] is None
        assert record.participants == ("node-b", "node-c")
