"""Node loss: a daemon lost (SIGKILL, or SIGSTOP like a partition) to the survivors' next step.

Three daemons (``nproc_per_node 1``, an external etcd on loopback) train at world size 3. Per
TTL, trial 1 SIGKILLs a node other than the one relaying global rank 0 (its worker dies with it:
PDEATHSIG), trial 2 SIGKILLs the rank-0 node (whose worker hosts the round's TCPStore), trial 3
SIGSTOPs a non-rank-0 daemon and its worker (no TCP reset: like a partitioned or frozen host,
only the lease can tell). Each waits for the first step at world size 2; the time is that
step's ``ts`` - t0. The killed node is then restarted and the group grows back
to 3 before the next trial. Run for ``etcd.ttl_seconds`` 5 and 10. Survivors learn of the loss
either from the node's lease expiring (<= TTL) or sooner, when the dead worker breaks a
collective and a survivor's worker exits (``crash``): both paths count.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from bench.cluster import Cluster, job, now
from bench.common import Section, Target, figure, fmt, spread, table
from model.prepare import ensure_demo
from tests.support.daemons import Daemon
from tests.support.etcd import EtcdServer

TITLE = "2. Node loss (daemon SIGKILL)"
BOUND_EXTRA_SECONDS = 60.0


def freeze(daemon: Daemon) -> None:
    """SIGSTOP the daemon and its workers: no TCP reset, only the lease can tell (a partition)."""
    for pid in [daemon.proc.pid, *daemon.worker_pids()]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)


def trials_for_ttl(work: Path, demo: Path, endpoint: str, ttl: float, trials: int) -> list[dict]:
    cluster = Cluster(
        job(work, demo, endpoint, run_id=f"loss-ttl{ttl:.0f}", ttl_seconds=ttl),
        work / f"logs-ttl{ttl:.0f}",
    )
    out = []
    try:
        for name in ("a", "b", "c"):
            cluster.start(name)
        cluster.wait_world(3, after_ts=0, timeout_seconds=240)
        for i in range(trials):
            rank0 = cluster.rank0_node()
            victim = rank0 if i % 2 else next(n for n in ("c", "b", "a") if n != rank0)
            t0 = now()
            how = "stop" if i % 3 == 2 else "kill"
            freeze(cluster.live[victim]) if how == "stop" else cluster.live[
                victim
            ].kill_with_workers()
            try:
                row = cluster.wait_world(2, after_ts=t0, timeout_seconds=ttl + BOUND_EXTRA_SECONDS)
                seconds = row["ts"] - t0
            except AssertionError:
                seconds = None
            reasons = sorted(
                {
                    e.get("reason", "?")
                    for d in cluster.live.values()
                    if d.name != victim
                    for e in d.events("restart")
                    if e["ts"] > t0
                }
            )
            out.append(
                {
                    "ttl": ttl,
                    "victim_rank0": victim == rank0,
                    "how": how,
                    "seconds": seconds,
                    "reasons": reasons,
                }
            )
            print(f"[node_loss] ttl {ttl} trial {i + 1}: {out[-1]}", file=sys.stderr, flush=True)
            if seconds is None:
                break
            cluster.live[victim].stop()  # a frozen daemon is killed now
            if i + 1 < trials:
                cluster.start(victim)
                cluster.wait_world(3, after_ts=now(), timeout_seconds=240)
    finally:
        cluster.stop()
    return out


def plot(rows: list[dict], ttls: list[float]) -> str:
    name = "node_loss.png"
    with figure(name, (5, 3.5)) as ax:
        styles = {"stop": ("^", "C2"), "rank0": ("o", "C3"), "other": ("s", "C0")}
        for r in rows:
            if r["seconds"] is not None:
                key = (
                    "stop"
                    if r.get("how") == "stop"
                    else ("rank0" if r["victim_rank0"] else "other")
                )
                marker, color = styles[key]
                ax.plot(r["ttl"], r["seconds"], marker, color=color, alpha=0.7)
        ax.plot(ttls, [t + 5 for t in ttls], "k--", label="target: TTL + 5 s")
        ax.plot(ttls, ttls, "k:", label="TTL")
        ax.plot([], [], "o", color="C3", label="SIGKILL, the rank-0 node")
        ax.plot([], [], "s", color="C0", label="SIGKILL, another node")
        ax.plot([], [], "^", color="C2", label="SIGSTOP (partition-like)")
        ax.set_xlabel("etcd.ttl_seconds")
        ax.set_ylabel("kill -> survivors' next step (s)")
        ax.set_xlim(0, max(ttls) + 3)
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
    return name


def run(work: Path, *, quick: bool) -> Section:
    demo = work / "demo"
    ensure_demo(demo)
    ttls = [5.0] if quick else [5.0, 10.0]
    trials = 1 if quick else 3
    server = EtcdServer(work / "etcd").start()
    rows: list[dict] = []
    try:
        for ttl in ttls:
            rows += trials_for_ttl(work, demo, server.endpoint, ttl, trials)
    finally:
        server.kill()
    table_rows = []
    targets = []
    for ttl in ttls:
        mine = [r for r in rows if r["ttl"] == ttl]
        ok = [r["seconds"] for r in mine if r["seconds"] is not None]
        s = spread(ok)
        reasons = sorted({x for r in mine for x in r["reasons"]})
        table_rows.append(
            [
                f"{ttl:.0f}",
                len(mine),
                len(ok),
                fmt(s["median"]),
                fmt(s["min"]),
                fmt(s["max"]),
                fmt(ttl + 5, 0),
                ", ".join(reasons),
            ]
        )
        met = bool(ok) and len(ok) == len(mine) and s["max"] <= ttl + 5
        targets.append(
            Target(
                f"node loss, TTL {ttl:.0f} s",
                f"<= {ttl + 5:.0f} s (TTL + 5)",
                f"median {fmt(s['median'])} s, max {fmt(s['max'])} s",
                met,
            )
        )
    body = "\n\n".join(
        [
            __doc__.split("\n", 2)[2].strip(),
            table(
                [
                    "TTL s",
                    "trials",
                    "recovered",
                    "median s",
                    "min s",
                    "max s",
                    "target s",
                    "survivors' restart reasons",
                ],
                table_rows,
            ),
            "Per trial: "
            + "; ".join(
                f"TTL {r['ttl']:.0f}: {fmt(r['seconds'])} s"
                f" ({'SIGSTOP' if r.get('how') == 'stop' else 'SIGKILL'}, "
                f"{'rank-0 node' if r['victim_rank0'] else 'other node'}, "
                f"{'/'.join(r['reasons'])})"
                for r in rows
            ),
        ]
    )
    return Section("node_loss", TITLE, body, targets, [plot(rows, ttls)], data={"rows": rows})
