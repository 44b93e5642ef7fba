"""Membership at 1,024 and 2,048 nodes (issue 17): the round and node-loss detection with
participants as asyncio clients, each on its own gRPC connection to a real etcd.

Usage: ``python -m bench.membership_scale [--sizes 1024,2048] [--loss-size 1024]
[--loss-ttl 3] [--json PATH]`` (also ``python -m bench --only membership_scale``).

Why a second harness. bench/membership.py runs a real ``GroupView`` and ``RoundJoiner`` per
participant, a thread each; past ~256 participants on two cores those threads, not etcd or the
protocol, set the time (1,024 closes 0.11 s after the last join, and the 1,024 Python views then
need 11 s of CPU to take in the closed record). Here the round is the same protocol on the same
keys and records, with the work split as a cluster splits it:

- the **opener** is the real thing: an ``EtcdClient``, a lease, its node record, a ``GroupView``
  and a ``RoundJoiner`` in a thread, which opens round 1 by compare-and-set, watches
  ``joins/<round>/`` and closes the round by compare-and-set with the sorted participants;
- every **other participant** is a coroutine with its own ``grpc.aio`` channel (its own TCP
  connection: ``grpc.use_local_subchannel_pool``), a lease, its node record (state ``active``),
  and a watch on ``group/round``. At one common instant each puts its join record
  (``JoinRecord``) under its lease, then waits for the closed round on its watch.

Measured for each size N (min = max = N, no last call): from the last join put done to the last
participant holding the closed round's bytes (etcd's fan-out, received in this one process one
after another, so an upper bound), the close's compare-and-set to the same, and the decode of the
closed record with ``records.decode_round`` (the real validation), timed per participant after
all were received: each node decodes only its own, on its own CPU, so the round's time is the
receipt plus one decode (the slowest). etcd writes per round: the header revision before and
after (N + 2 expected: N joins, the open and the close).

Node loss (at ``--loss-size``): every participant opens a watch on ``group/nodes/`` (the key
range a daemon's ``GroupView`` watches); one extra node puts its record under a lease of
``--loss-ttl`` seconds, sends one keep-alive and stops. Measured: from that keep-alive's reply to
each watcher receiving the record's deletion, minus the TTL (p50, max).

The participants' leases have a TTL longer than the run (``PARTICIPANT_TTL_SECONDS``) so that no
keep-alive traffic competes with the measurement; keep-alives write no revision (idle growth is
measured in bench/membership.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from etcd3 import etcdrpc

from bench.common import RESULTS_DIR, Section, Target, fmt, table
from bench.membership_worker import _TimedClient
from elastic.rendezvous.config import EtcdConfig
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.records import JoinRecord, RoundRecord, decode_round, encode_node
from elastic.rendezvous.rounds import JoinSettings, RoundJoiner
from elastic.rendezvous.view import GroupView
from tests.support.etcd import EtcdServer

TITLE = "11. Membership at 1,024 and 2,048 nodes (issue 17, asyncio clients)"
KEY_PREFIX = "/elasticd"
OPENER = "node-00000"
PARTICIPANT_TTL_SECONDS = 600
SETUP_CONCURRENCY = 128  # lease grants and record puts in flight while connecting
START_DELAY_SECONDS = 2.0  # every watch is created before the common join instant
ROUND_TIMEOUT_SECONDS = 120.0
LOSS_BOUND_SECONDS = 60.0
MASTER_PORT = 29500
DELETE = 1  # mvccpb.Event.EventType
ROUND_TARGETS = {1024: 2.0, 2048: 3.0}  # seconds, last join put -> every participant has it
LOSS_TARGET_MINUS_TTL_SECONDS = 1.0

T = TypeVar("T")


@dataclass
class Participant:
    name: str
    channel: grpc.aio.Channel
    kv: etcdrpc.KVStub
    lease: etcdrpc.LeaseStub
    watch: etcdrpc.WatchStub
    lease_id: int = 0
    put_done: float = 0.0
    received: float = 0.0
    closed_bytes: bytes = b""
    decode_seconds: float = 0.0
    round: RoundRecord | None = None


def _progress(line: str) -> None:
    print(f"[membership_scale] {line}", file=sys.stderr, flush=True)


async def _bounded(items: Sequence[T], fn: Callable[[T], Awaitable[Any]]) -> None:
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(item: T) -> None:
        async with gate:
            await fn(item)

    await asyncio.gather(*(one(item) for item in items))


async def connect(endpoint: str, name: str, keys: RunKeys) -> Participant:
    channel = grpc.aio.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)])
    stubs = (etcdrpc.KVStub(channel), etcdrpc.LeaseStub(channel), etcdrpc.WatchStub(channel))
    p = Participant(name, channel, *stubs)
    grant = await p.lease.LeaseGrant(etcdrpc.LeaseGrantRequest(TTL=PARTICIPANT_TTL_SECONDS))
    p.lease_id = grant.ID
    record = encode_node({"state": "active"})
    await p.kv.Put(etcdrpc.PutRequest(key=keys.node(name).encode(), value=record, lease=p.lease_id))
    return p


async def revision(p: Participant) -> int:
    reply = await p.kv.Range(etcdrpc.RangeRequest(key=b"/membership-scale-none", count_only=True))
    return int(reply.header.revision)


async def open_watch(p: Participant, key: str, *, prefix: bool, start_revision: int) -> Any:
    """A watch stream on ``key`` (or its prefix) from ``start_revision``, once etcd created it."""
    call = p.watch.Watch()
    range_end = _prefix_end(key.encode()) if prefix else b""
    create = etcdrpc.WatchCreateRequest(
        key=key.encode(), range_end=range_end, start_revision=start_revision
    )
    await call.write(etcdrpc.WatchRequest(create_request=create))
    reply = await call.read()
    assert reply.created, reply
    return call


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


async def join_and_wait(p: Participant, keys: RunKeys, call: Any, start_at: float) -> None:
    """Put the join record at ``start_at``; keep the closed round's bytes when they arrive."""
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    join = JoinRecord(name=p.name, addr="127.0.0.1", port=MASTER_PORT).to_bytes()
    key = f"{keys.joins(1)}{p.name}".encode()
    await p.kv.Put(etcdrpc.PutRequest(key=key, value=join, lease=p.lease_id))
    p.put_done = time.monotonic()
    while not p.closed_bytes:
        reply = await call.read()
        for event in reply.events:
            if b'"closed"' in event.kv.value:  # decoded below, after every receipt
                p.closed_bytes, p.received = bytes(event.kv.value), time.monotonic()


class Opener:
    """The real protocol's opener in a thread: opens round 1, closes it at ``num_nodes``."""

    def __init__(self, endpoint: str, keys: RunKeys, num_nodes: int) -> None:
        self.kv = _TimedClient(EtcdConfig(endpoints=(endpoint,)), keys)
        self.lease_id = self.kv.grant_lease(PARTICIPANT_TTL_SECONDS)
        self.kv.put(keys.node(OPENER), encode_node({"state": "active"}), lease_id=self.lease_id)
        self.view = GroupView(self.kv, keys).start()
        self.joiner = RoundJoiner(
            self.kv,
            keys,
            self.view,
            name=OPENER,
            addr="127.0.0.1",
            lease_id=lambda: self.lease_id,
            port=lambda: MASTER_PORT,
            expected=lambda snap: set(),
        )
        self._settings = JoinSettings(
            min_nodes=num_nodes,
            max_nodes=num_nodes,
            last_call_seconds=0.0,
            timeout_seconds=ROUND_TIMEOUT_SECONDS,
        )
        self.result: RoundRecord | BaseException | None = None
        self._thread = threading.Thread(target=self._join, name="opener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _join(self) -> None:
        try:
            self.result = self.joiner.join(self._settings, after_round=0)
        except BaseException as exc:  # reported by the coordinator
            self.result = exc

    def wait_open(self, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not (self.view.snapshot.round and self.view.snapshot.round.round == 1):
            if time.monotonic() > deadline:
                raise TimeoutError("round 1 was not opened")
            self.view.wait(self.view.generation, 0.5)

    def finish(self, timeout_seconds: float) -> RoundRecord:
        self._thread.join(timeout_seconds)
        if not isinstance(self.result, RoundRecord):
            raise RuntimeError(f"the opener did not close round 1: {self.result!r}")
        return self.result

    def close(self) -> None:
        self.view.close()
        self.kv.close()


async def one_round(endpoint: str, num_nodes: int, *, loss_ttl: int | None) -> dict[str, Any]:
    """Round 1 of ``num_nodes``; then, with ``loss_ttl``, a node loss seen by all of them."""
    keys = RunKeys(KEY_PREFIX, f"scale-{uuid.uuid4().hex[:8]}")
    names = [f"node-{i:05d}" for i in range(1, num_nodes)]
    started = time.monotonic()
    participants: list[Participant] = []

    async def add(name: str) -> None:
        participants.append(await connect(endpoint, name, keys))

    await _bounded(names, add)
    setup_seconds = time.monotonic() - started
    _progress(f"{num_nodes}: {len(participants)} connected in {setup_seconds:.1f} s")
    opener = await asyncio.to_thread(Opener, endpoint, keys, num_nodes)
    try:
        everyone = participants
        before = await revision(participants[0])  # the round's writes: open, joins, close
        opener.start()
        await asyncio.to_thread(opener.wait_open, 60.0)
        opened = await revision(participants[0])
        watches = await asyncio.gather(
            *(open_watch(p, keys.round, prefix=False, start_revision=opened + 1) for p in everyone)
        )
        start_at = time.monotonic() + START_DELAY_SECONDS
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    join_and_wait(p, keys, w, start_at)
                    for p, w in zip(everyone, watches, strict=True)
                )
            ),
            ROUND_TIMEOUT_SECONDS,
        )
        record = await asyncio.to_thread(opener.finish, ROUND_TIMEOUT_SECONDS)
        last = await revision(participants[0])
        for w in watches:
            w.cancel()
        result = _round_figures(participants, opener, record, start_at, writes=last - before)
        result["setup_seconds"] = round(setup_seconds, 2)
        if loss_ttl is not None:
            result["loss"] = await node_loss(endpoint, keys, participants, loss_ttl)
        return result
    finally:
        await asyncio.to_thread(opener.close)
        await asyncio.gather(*(p.channel.close() for p in participants))


def _round_figures(
    participants: list[Participant],
    opener: Opener,
    record: RoundRecord,
    start_at: float,
    *,
    writes: int,
) -> dict[str, Any]:
    for p in participants:  # after every receipt: one decode each, as each node does its own
        t0 = time.perf_counter()
        p.round = decode_round("round", p.closed_bytes)
        p.decode_seconds = time.perf_counter() - t0
        assert p.name in p.round.participants and p.round == record, p.name
    last_put = max(p.put_done for p in participants)
    last_received = max(p.received for p in participants)
    decode = [p.decode_seconds for p in participants]
    closed_at = opener.kv.closed_at
    close_sent_at = opener.kv.close_sent_at
    return {
        "num_nodes": len(participants) + 1,
        "participants": len(record.participants),
        "last_put_to_all_received_seconds": last_received - last_put,
        "last_put_to_close_seconds": closed_at - last_put if closed_at else None,
        "close_to_all_received_seconds": last_received - closed_at if closed_at else None,
        "close_sent_to_all_received_seconds": (
            last_received - close_sent_at if close_sent_at else None
        ),
        "join_instant_to_all_received_seconds": last_received - start_at,
        "decode_p50_seconds": statistics.median(decode),
        "decode_max_seconds": max(decode),
        "round_seconds": last_received - last_put + max(decode),
        "record_bytes": len(participants[0].closed_bytes),
        "writes": writes,
    }


async def node_loss(
    endpoint: str, keys: RunKeys, watchers: list[Participant], ttl_seconds: int
) -> dict[str, Any]:
    """One more node's lease (TTL ``ttl_seconds``) stops its keep-alives; each watcher's delay."""
    victim = await connect(endpoint, "node-lost", keys)
    try:
        grant = await victim.lease.LeaseGrant(etcdrpc.LeaseGrantRequest(TTL=ttl_seconds))
        key = keys.node(victim.name).encode()
        await victim.kv.Put(
            etcdrpc.PutRequest(key=key, value=encode_node({"state": "active"}), lease=grant.ID)
        )
        start = await revision(victim) + 1
        watches = await asyncio.gather(
            *(open_watch(w, keys.nodes, prefix=True, start_revision=start) for w in watchers)
        )
        stream = victim.lease.LeaseKeepAlive()
        await stream.write(etcdrpc.LeaseKeepAliveRequest(ID=grant.ID))
        await stream.read()
        last_keep_alive = time.monotonic()
        stream.cancel()

        async def deleted(call: Any) -> float:
            while True:
                reply = await call.read()
                if any(e.type == DELETE and e.kv.key == key for e in reply.events):
                    return time.monotonic()

        seen = await asyncio.wait_for(
            asyncio.gather(*(deleted(c) for c in watches)), ttl_seconds + LOSS_BOUND_SECONDS
        )
        for c in watches:
            c.cancel()
        delays = [t - last_keep_alive for t in seen]
        return {
            "ttl_seconds": ttl_seconds,
            "watchers": len(seen),
            "p50_minus_ttl_seconds": statistics.median(delays) - ttl_seconds,
            "max_minus_ttl_seconds": max(delays) - ttl_seconds,
        }
    finally:
        await victim.channel.close()


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    server = EtcdServer(work / "etcd").start()
    try:
        sizes: dict[str, Any] = {}
        for n in args.sizes:
            try:
                loss_ttl = args.loss_ttl if n == args.loss_size else None
                sizes[str(n)] = asyncio.run(one_round(server.endpoint, n, loss_ttl=loss_ttl))
            except Exception as exc:  # a size the machine cannot host is a result too
                sizes[str(n)] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            _progress(f"{n}: {json.dumps(sizes[str(n)], default=str)}")
        return {"sizes": sizes}
    finally:
        server.kill()


def targets(data: dict[str, Any]) -> list[Target]:
    out = []
    for n, goal in ROUND_TARGETS.items():
        entry = data["sizes"].get(str(n), {})
        seconds = entry.get("round_seconds")
        out.append(
            Target(
                f"round of {n:,} (last join put -> every participant has it decoded)",
                f"<= {goal:g} s",
                fmt(seconds) + " s" if seconds is not None else entry.get("error", "not run"),
                None if seconds is None else seconds <= goal,
            )
        )
    for n, entry in data["sizes"].items():
        if "writes" in entry:
            out.append(
                Target(
                    f"etcd writes per round at {n}",
                    f"<= N + 4 = {int(n) + 4}",
                    str(entry["writes"]),
                    entry["writes"] <= int(n) + 4,
                )
            )
        if "loss" in entry:
            late = entry["loss"]["max_minus_ttl_seconds"]
            out.append(
                Target(
                    f"node-loss detection at {n} (all watchers)",
                    f"<= TTL + {LOSS_TARGET_MINUS_TTL_SECONDS:g} s",
                    f"TTL + {fmt(late)} s",
                    late <= LOSS_TARGET_MINUS_TTL_SECONDS,
                )
            )
    return out


def section(data: dict[str, Any]) -> Section:
    rows = [
        [
            n,
            fmt(e.get("setup_seconds")),
            fmt(e.get("last_put_to_close_seconds")),
            fmt(e.get("close_to_all_received_seconds")),
            fmt(e.get("last_put_to_all_received_seconds")),
            fmt(e.get("join_instant_to_all_received_seconds")),
            f"{e['decode_p50_seconds'] * 1e3:.2f} / {e['decode_max_seconds'] * 1e3:.2f}"
            if "decode_p50_seconds" in e
            else "-",
            fmt(e.get("round_seconds")),
            e.get("record_bytes", "-"),
            e.get("writes", e.get("error", "-")),
        ]
        for n, e in data["sizes"].items()
    ]
    loss = [
        [
            n,
            e["loss"]["ttl_seconds"],
            e["loss"]["watchers"],
            fmt(e["loss"]["p50_minus_ttl_seconds"]),
            fmt(e["loss"]["max_minus_ttl_seconds"]),
        ]
        for n, e in data["sizes"].items()
        if "loss" in e
    ]
    head = [
        "participants",
        "setup s",
        "last put -> close s",
        "close -> all received s",
        "last put -> all received s",
        "join instant -> all received s",
        "decode p50 / max ms",
        "round s",
        "record B",
        "writes",
    ]
    body = "\n\n".join(
        [
            __doc__.split("\n", 2)[2].strip(),
            f"Command: `{data['command']}`. Machine: 2 shared cores for etcd, the opener and "
            "every participant's channel in one event loop.",
            table(head, rows),
            "Node loss (seconds from the lost node's last keep-alive to each watcher receiving "
            "the deletion, minus the TTL):",
            table(["participants", "TTL s", "watchers", "p50 - TTL s", "max - TTL s"], loss),
        ]
    )
    return Section("membership_scale", TITLE, body, targets(data), data=data)


def parse(argv: list[str] | None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(s) for s in text.split(",") if s]

    parser = argparse.ArgumentParser(
        prog="python -m bench.membership_scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sizes", type=ints, default=[1024, 2048])
    parser.add_argument("--loss-size", type=int, default=1024)
    parser.add_argument("--loss-ttl", type=int, default=3, help="the lost node's TTL, seconds")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "membership_scale_run.json")
    return parser.parse_args(argv)


def collect(args: argparse.Namespace, work: Path, command: str) -> Section:
    data = measure(args, work)
    data["command"] = command
    return section(data)


def run(work: Path, *, quick: bool) -> Section:
    """``python -m bench``'s entry: 1,024 and 2,048, or 32 and 64 with ``--quick``."""
    argv = ["--sizes", "32,64", "--loss-size", "64"] if quick else []
    command = "python -m bench --only membership_scale" + (" --quick" if quick else "")
    return collect(parse(argv), work, command)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = "python -m bench.membership_scale " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench-membership-scale-") as tmp:
        result = collect(args, Path(tmp), command.strip())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result.data, indent=1, default=str))
    print(result.body)
    print()
    print(
        table(
            ["target", "goal", "measured", "met"],
            [[t.name, t.goal, t.measured, t.met] for t in result.targets],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
