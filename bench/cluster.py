"""Several `elasticd run` daemons on one external etcd, for the node-loss and resize benches."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.support.daemons import Daemon, merged_steps, start_daemon, tiny_job
from tests.support.procs import wait_for

STARTUP_SECONDS = 240.0


def job(
    work: Path, demo: Path, endpoint: str, *, run_id: str, ttl_seconds: float
) -> dict[str, Any]:
    return tiny_job(
        work / run_id,
        demo,
        endpoint=endpoint,
        run_id=run_id,
        nodes={"min": 1, "max": 3},
        etcd={"ttl_seconds": ttl_seconds},
        watchdog={"max_restarts": 1000, "restart_window_seconds": 60.0},
        train={"steps": 1_000_000, "log_sample_ids": False},
    )


class Cluster:
    """Daemons of one run; ``group`` holds every daemon ever started (for the merged log)."""

    def __init__(self, doc: dict[str, Any], log_dir: Path) -> None:
        self.doc = doc
        self.log_dir = log_dir
        self.group: list[Daemon] = []
        self.live: dict[str, Daemon] = {}
        self._starts = 0

    def start(self, name: str) -> Daemon:
        self._starts += 1
        daemon = start_daemon(self.doc, name=name, log_dir=self.log_dir / f"{name}-{self._starts}")
        self.group.append(daemon)
        self.live[name] = daemon
        return daemon

    def steps(self) -> list[dict[str, Any]]:
        return merged_steps(*self.group)

    def wait_world(self, size: int, *, after_ts: float, timeout_seconds: float) -> dict[str, Any]:
        """The first step at world size ``size`` logged after ``after_ts``."""

        def first() -> dict[str, Any] | None:
            for row in self.steps():
                if row["ts"] > after_ts and row["world_size"] == size:
                    return row
            return None

        return dict(wait_for(first, timeout_seconds=timeout_seconds, what=f"world size {size}"))

    def rank0_node(self) -> str:
        """The live daemon that relays global rank 0's step lines now."""
        latest = {n: d.steps() for n, d in self.live.items()}
        return max(latest, key=lambda n: max((r["ts"] for r in latest[n].values()), default=0))

    def stop(self) -> None:
        for daemon in self.group:
            daemon.stop()


def now() -> float:
    return time.time()
