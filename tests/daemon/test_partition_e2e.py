"""Network partitions between hosts (issue 16): real daemons, each in its own namespace.

Every daemon and etcd run in their own network namespace with their own address
(tests/support/netns.py); daemons reach each other only through ``nodes.address`` and etcd
only through its address. Partitions are made in the network, never with SIGSTOP: a node's
cable goes down at the bridge, or a blackhole route hides etcd from a node.

"Each step number completes exactly once" means, here: walk the run's rank-0 ``step`` and
``start`` lines and the committed checkpoints (their manifests on storage, at their
``time_unix``: a commit line can be lost when a round is stopped right after its manifest
landed, the manifest cannot) in time order. A round's ``start`` at step ``k`` must
resume from the newest commit so far (0: none) and cuts the lineage back to ``k`` (steps after
the newest commit are lost with the group that made them, and redone); every step line must
extend the lineage by exactly one (``lineage[-1] + 1``); the finished lineage is 1..steps. So no
committed step is ever redone, and none is skipped. Lines a cut-off node printed between its cut
and its rejoin are no completions (at most the step in flight: it cannot be committed, a commit
needs every rank, which the manifest check shows).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.policy import Kind, Observation, Reason, decide
from tests.support.daemons import Daemon, daemons, start_daemon, tiny_job, wait_world_size
from tests.support.netns import NetnsEtcd, TestNet, testnet
from tests.support.procs import wait_for

__all__ = ["testnet"]

TTL_SECONDS = 3
# The run outlasts every scenario whatever the machine's speed: each test ends it with a drain
# (SIGTERM to every daemon: a checkpoint, exit 0) once it has seen what it checks.
STEPS = 100_000
NODES = ("a", "b", "c")


class Bed:
    """etcd and three daemons on a :class:`TestNet`; the run's logs and checkpoints under tmp."""

    def __init__(self, net: TestNet, tmp: Path, demo: Path, *, run_id: str) -> None:
        self.net = net
        self.tmp = tmp
        self.etcd_host = net.add_host("etcd")
        self.hosts = {name: net.add_host(name) for name in NODES}
        self.etcd = NetnsEtcd(tmp / "etcd", host=self.etcd_host).start()
        self.run_id = run_id
        self.doc = tiny_job(
            tmp,
            demo,
            endpoint=self.etcd.endpoint,
            run_id=run_id,
            nodes={"min": 2, "max": 3},
            etcd={"ttl_seconds": TTL_SECONDS},
            train={"steps": STEPS},
            # Every checkpoint kept: the lineage check reads the commits from their manifests.
            checkpoint={"keep_last": 10_000},
        )

    def start(self, group: list[Daemon]) -> None:
        for name, host in self.hosts.items():
            daemon = start_daemon(
                self.doc,
                name=name,
                log_dir=self.tmp,
                # No GLOO_SOCKET_IFNAME: the host name resolves to loopback here (as on many
                # machines); the daemon points gloo at the interface of nodes.address itself.
                sets=(f"nodes.address={host.address}",),
                prefix=tuple(host.wrap([])),
            )
            group.append(daemon)

    def manifests(self) -> list[dict[str, Any]]:
        paths = (self.tmp / "ckpt" / self.run_id).glob("step-*/manifest.json")
        return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


@pytest.fixture
def bed(testnet: TestNet, tmp_path: Path, demo_corpus: Path) -> Iterator[Bed]:
    yield Bed(testnet, tmp_path, demo_corpus, run_id="netsplit")


def rank0_host(group: list[Daemon]) -> Daemon:
    """The node whose log has the newest step line (global rank 0 prints them)."""
    return max(group, key=lambda d: max((r["ts"] for r in d.events("step")), default=0.0))


def assert_each_step_once(
    group: list[Daemon],
    *,
    manifests: list[dict[str, Any]],
    cut: tuple[Daemon, float, float] | None = None,
) -> list[int]:
    """The lineage of the module docstring; ``cut`` = (node, cut ts, its rejoin ts)."""
    rows = [
        {"event": "checkpoint_commit", "step": m["step"], "ts": m["time_unix"]} for m in manifests
    ]
    for d in group:
        for r in d.events("step") + d.events("start"):
            if cut is not None and d is cut[0] and cut[1] < r["ts"] < cut[2]:
                continue
            rows.append(r)
    lineage: list[int] = []
    committed: list[int] = []
    for r in sorted(rows, key=lambda r: r["ts"]):
        if r["event"] == "checkpoint_commit":
            committed.append(int(r["step"]))
        elif r["event"] == "start":
            k = int(r["step"])
            assert k == max(committed, default=0), f"resumed at {k}, commits {committed[-1:]}"
            assert k <= len(lineage), f"resumed at {k} past the lineage {len(lineage)}"
            del lineage[k:]
        else:
            step = int(r["step"])
            assert step == len(lineage) + 1, f"step {step} after {len(lineage)}: {r}"
            lineage.append(step)
    assert lineage and lineage == list(range(1, len(lineage) + 1))
    return lineage


def drain_all(group: list[Daemon]) -> list[int]:
    """End the run: every daemon drains (its workers commit at the next step boundary)."""
    for d in group:
        d.signal(signal.SIGTERM)
    return [d.wait(timeout_seconds=120) for d in group]


def first_step_after(group: list[Daemon], ts: float, *, world_size: int) -> dict[str, Any]:
    return wait_world_size(group, world_size, timeout_seconds=60, after_ts=ts)


def test_a_fenced_node_stops_its_running_workers_at_once() -> None:
    obs = Observation(
        exit_codes=[None, None], last_progress_unix=100.0, now_unix=101.0, hang_timeout_seconds=30
    )
    assert decide(obs).kind is Kind.CONTINUE
    fenced = decide(dataclasses.replace(obs, fenced=True))
    assert (fenced.kind, fenced.reason) == (Kind.RESTART, Reason.NODE_LOST)
    # Mid-drain too (one worker out with 4): the others must not go on in the old group.
    half_drained = dataclasses.replace(obs, exit_codes=[4, None], fenced=True)
    assert decide(half_drained).kind is Kind.RESTART
    finished = dataclasses.replace(obs, exit_codes=[0, 0], fenced=True)
    assert decide(finished).kind is Kind.DONE


@pytest.mark.slow
def test_a_partitioned_node_is_fenced_the_others_go_on_and_it_rejoins(bed: Bed) -> None:
    with daemons() as group:
        bed.start(group)
        wait_world_size(group, 3, timeout_seconds=120)
        wait_for(
            lambda: [m for m in bed.manifests() if m["world_size"] == 3],
            timeout_seconds=60,
            what="a checkpoint of the 3-node group",
        )
        victim = rank0_host(group)  # the node that writes the manifests
        survivors = [d for d in group if d is not victim]
        cut_at = time.time()
        bed.net.cut(bed.hosts[victim.name])
        first = first_step_after(survivors, cut_at, world_size=2)
        recovery_seconds = first["ts"] - cut_at
        # A commit of the 2-node group, then heal: the victim's lease is long gone by now.
        wait_for(
            lambda: [m for m in bed.manifests() if m["world_size"] == 2],
            timeout_seconds=60,
            what="a checkpoint of the 2-node group",
        )
        healed_at = time.time()
        bed.net.heal(bed.hosts[victim.name])
        back = first_step_after(group, healed_at, world_size=3)
        rejoin_seconds = back["ts"] - healed_at
        codes = drain_all(group)
    print(
        f"ttl {TTL_SECONDS} s: cut -> step at 2 nodes {recovery_seconds:.1f} s; "
        f"heal -> step at 3 nodes {rejoin_seconds:.1f} s"
    )
    assert codes == [0, 0, 0]
    assert recovery_seconds <= TTL_SECONDS + 5
    # Fencing: once reachable again, the victim learnt that its lease had expired and stopped
    # the old round's workers (nothing else would: their peers were gone).
    assert victim.events("fenced"), "the victim never noticed its lease had expired"
    restarts = [r["reason"] for r in victim.events("restart") if r["ts"] > cut_at]
    assert restarts and set(restarts) <= {"node_lost", "hang", "crash"}
    # No commit of the old (3-node) group after the cut: the cut rank 0 wrote no manifest.
    late = [m for m in bed.manifests() if cut_at < m["time_unix"] < back["ts"]]
    assert late and all(m["world_size"] == 2 for m in late), late
    rejoined = min(r["ts"] for r in victim.events("state") if r["ts"] > healed_at)
    # Its workers stopped training: at most the step in flight completed after the cut.
    stale = [r["step"] for r in victim.events("step") if cut_at < r["ts"] < rejoined]
    assert len(stale) <= 1, stale
    assert_each_step_once(group, manifests=bed.manifests(), cut=(victim, cut_at, rejoined))


@pytest.mark.slow
def test_etcd_cut_from_one_node_drops_it_and_it_rejoins_when_healed(bed: Bed) -> None:
    with daemons() as group:
        bed.start(group)
        wait_world_size(group, 3, timeout_seconds=120)
        victim = next(d for d in group if d is not rank0_host(group))
        survivors = [d for d in group if d is not victim]
        cut_at = time.time()
        bed.net.block(bed.hosts[victim.name], bed.etcd_host.address)
        first = first_step_after(survivors, cut_at, world_size=2)
        recovery_seconds = first["ts"] - cut_at
        healed_at = time.time()
        bed.net.unblock(bed.hosts[victim.name], bed.etcd_host.address)
        back = first_step_after(group, healed_at, world_size=3)
        rejoin_seconds = back["ts"] - healed_at
        codes = drain_all(group)
    print(
        f"ttl {TTL_SECONDS} s: etcd cut from {victim.name} -> step at 2 nodes "
        f"{recovery_seconds:.1f} s; heal -> step at 3 nodes {rejoin_seconds:.1f} s"
    )
    assert codes == [0, 0, 0]
    assert recovery_seconds <= TTL_SECONDS + 5
    # Its lease expired while it could not reach etcd (the others re-formed without it); once
    # back it was fenced, whatever its workers were doing.
    assert victim.events("fenced")
    assert_each_step_once(group, manifests=bed.manifests())


@pytest.mark.slow
def test_etcd_cut_from_every_node_training_goes_on(bed: Bed) -> None:
    with daemons() as group:
        bed.start(group)
        wait_world_size(group, 3, timeout_seconds=120)
        cut_at = time.time()
        bed.net.cut(bed.etcd_host)
        wait_for(
            lambda: all(d.events("etcd_down") for d in group),
            timeout_seconds=30,
            what="every node noticing etcd is gone",
        )
        # Steps keep completing while etcd is away, for longer than a lease lives.
        during = wait_for(
            lambda: [
                r for d in group for r in d.events("step") if r["ts"] > cut_at + TTL_SECONDS + 2
            ],
            timeout_seconds=60,
            what="steps a lease TTL into the outage",
        )
        restarts_during = [
            r for d in group for r in d.events("restart") if r["ts"] < during[0]["ts"]
        ]
        healed_at = time.time()
        bed.net.heal(bed.etcd_host)
        # The leases expired on etcd's clock meanwhile: each node, reaching etcd again, is
        # fenced and the group re-forms at 3 (the training pause this costs is printed).
        wait_for(
            lambda: all(d.events("fenced") for d in group),
            timeout_seconds=60,
            what="every node fenced once etcd is back",
        )
        last_fenced = max(r["ts"] for d in group for r in d.events("fenced"))
        resumed = first_step_after(group, last_fenced, world_size=3)
        codes = drain_all(group)
    assert codes == [0, 0, 0]
    pause_seconds = resumed["ts"] - healed_at
    print(f"ttl {TTL_SECONDS} s: etcd healed -> step of the new round {pause_seconds:.1f} s")
    assert not restarts_during, f"the outage stopped training: {restarts_during}"
    assert_each_step_once(group, manifests=bed.manifests())
