"""Live resize: training pause and steps lost when a node joins (grow) or leaves (shrink).

Two daemons (``nproc_per_node 1``, external etcd) train; a third starts (grow 2 -> 3), then a
daemon gets SIGTERM (shrink 3 -> 2), repeated. Pause = ``ts`` of the first step at the new
world size - ``ts`` of the last step before it (that step's duration is in it too).
Steps lost = steps that had to be computed again or never were: the completed step numbers
across the change must be consecutive, each exactly once. Compared with the duration of the
checkpoint the group commits at the drain step (``checkpoint_commit.duration_seconds``).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from bench.cluster import Cluster, job, now
from bench.common import Section, Target, fmt, spread, table
from model.prepare import ensure_demo
from tests.support.etcd import EtcdServer
from tests.support.procs import wait_for

TITLE = "3. Live resize"


def measure(cluster: Cluster, *, size: int, t0: float) -> dict[str, Any]:
    first = cluster.wait_world(size, after_ts=t0, timeout_seconds=240)
    rows = cluster.steps()
    before = [r for r in rows if r["ts"] < first["ts"]]
    last = before[-1]
    commits = [
        e
        for d in cluster.group
        for e in d.events("checkpoint_commit")
        if e.get("step") == last["step"]
    ]
    save = max((float(e["duration_seconds"]) for e in commits), default=float("nan"))
    return {
        "phases": phases(cluster, start=last["ts"], end=first["ts"]),
        "pause": first["ts"] - last["ts"],
        "last_step": last["step"],
        "first_step": first["step"],
        "save": save,
    }


PHASE_EVENTS = (
    "checkpoint_commit",
    "worker_exit",
    "round",
    "workers_started",
    "start",
    "checkpoint_load",
)


def phases(cluster: Cluster, *, start: float, end: float) -> dict[str, float]:
    """Seconds from the last old step to the first line of each lifecycle event in the pause."""
    out: dict[str, float] = {}
    for daemon in cluster.group:
        for line in daemon.lines():
            name, ts = line.get("event"), float(line.get("ts", 0))
            if name in PHASE_EVENTS and start <= ts <= end:
                out[name] = min(out.get(name, ts - start), ts - start)
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def steps_lost(cluster: Cluster) -> int:
    """Repeats + gaps in the completed step numbers of the whole run."""
    steps = [int(r["step"]) for r in cluster.steps()]
    repeats = len(steps) - len(set(steps))
    gaps = (max(steps) - min(steps) + 1) - len(set(steps)) if steps else 0
    return repeats + gaps


def run(work: Path, *, quick: bool) -> Section:
    demo = work / "demo"
    ensure_demo(demo)
    cycles = 1 if quick else 2
    server = EtcdServer(work / "etcd").start()
    cluster = Cluster(
        job(work, demo, server.endpoint, run_id="resize", ttl_seconds=5), work / "logs"
    )
    rows: list[dict[str, Any]] = []
    try:
        cluster.start("a")
        cluster.start("b")
        cluster.wait_world(2, after_ts=0, timeout_seconds=240)
        for _ in range(cycles):
            t0 = now()
            cluster.start("c")
            rows.append({"kind": "grow 2 -> 3", **measure(cluster, size=3, t0=t0)})
            print(f"[resize] {rows[-1]}", file=sys.stderr, flush=True)
            leaving = cluster.live.pop("c")
            t0 = now()
            leaving.signal(signal.SIGTERM)
            rows.append({"kind": "shrink 3 -> 2", **measure(cluster, size=2, t0=t0)})
            print(f"[resize] {rows[-1]}", file=sys.stderr, flush=True)
            code = wait_for(
                lambda d=leaving: d.proc.poll() is not None or None,
                timeout_seconds=120,
                what="leaving daemon exits",
            )
            rows[-1]["exit_code"] = leaving.proc.returncode if code else None
        lost = steps_lost(cluster)
    finally:
        cluster.stop()
        server.kill()
    table_rows, targets = [], []
    for kind in ("grow 2 -> 3", "shrink 3 -> 2"):
        mine = [r for r in rows if r["kind"] == kind]
        pause, save = spread([r["pause"] for r in mine]), spread([r["save"] for r in mine])
        table_rows.append(
            [
                kind,
                len(mine),
                fmt(pause["median"]),
                fmt(pause["min"]),
                fmt(pause["max"]),
                fmt(save["median"]),
                fmt(pause["median"] - save["median"]),
            ]
        )
        worst = max(r["pause"] - r["save"] for r in mine)
        targets.append(
            Target(
                f"{kind} pause",
                "<= checkpoint save + 5 s",
                f"pause - save: max {worst:.2f} s",
                worst <= 5.0,
            )
        )
    targets.insert(0, Target("steps lost", "0", str(lost), lost == 0))
    body = "\n\n".join(
        [
            __doc__.split("\n", 2)[2].strip(),
            table(
                [
                    "change",
                    "trials",
                    "median pause s",
                    "min s",
                    "max s",
                    "median save s",
                    "pause - save s",
                ],
                table_rows,
            ),
            f"Steps lost over the whole run (repeats + gaps in the step numbers): **{lost}**.",
            "Per change: "
            + "; ".join(
                f"{r['kind']}: steps {r['last_step']} -> {r['first_step']}, pause "
                f"{fmt(r['pause'])} s, save {fmt(r['save'])} s (first of each event, s after the "
                f"last old step: "
                + ", ".join(f"{k} {v:.1f}" for k, v in r.get("phases", {}).items())
                + ")"
                for r in rows
            ),
        ]
    )
    return Section("resize", TITLE, body, targets, data={"rows": rows, "lost": lost})
