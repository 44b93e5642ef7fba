"""`elasticd run` daemons as real processes on loopback, for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.jobs import with_overrides
from tests.support.procs import REPO, base_env, events, read_lines, wait_for, write_config

EXAMPLES = REPO / "examples"


def daemon_sections(tmp: Path, *, endpoint: str | None, run_id: str) -> dict[str, Any]:
    """The daemon's side of every end-to-end job: loopback, short timeouts, a free HTTP port,
    the run directory under ``tmp``; no endpoint: the embedded etcd."""
    return {
        "run_id": run_id,
        "run_dir": str(tmp / "run"),
        "nodes": {
            "address": "127.0.0.1",
            "last_call_seconds": 2.0,
        },
        "etcd": {"endpoints": [endpoint] if endpoint else [], "ttl_seconds": 3},
        "watchdog": {"timeout_seconds": 20, "startup_timeout_seconds": 120, "poll_seconds": 0.2},
        "drain": {"timeout_seconds": 60},
        "metrics": {"port": 0},
    }


def example_job(
    name: str, tmp: Path, *, endpoint: str | None, run_id: str = "e2e", **overrides: Any
) -> dict[str, Any]:
    """``examples/<name>`` as a test runs it: :func:`daemon_sections` merged in, checkpoints
    under ``tmp``; then ``overrides``, merged per section."""
    doc = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
    doc = with_overrides(doc, daemon_sections(tmp, endpoint=endpoint, run_id=run_id))
    doc = with_overrides(doc, {"checkpoint": {"url": str(tmp / "ckpt")}})
    return with_overrides(doc, overrides)


def tiny_job(
    tmp: Path, demo: Path, *, endpoint: str | None, run_id: str = "e2e", **overrides: Any
) -> dict[str, Any]:
    """A CPU-cheap job: tiny model, 24 samples x 32 tokens per step, 1 worker per node."""
    doc: dict[str, Any] = {
        **daemon_sections(tmp, endpoint=endpoint, run_id=run_id),
        "nproc_per_node": 1,
        "checkpoint": {"url": str(tmp / "ckpt"), "interval_steps": 10, "keep_last": 20},
        "rewind": {"min_steps_back": 10, "good_after_steps": 5},
        "model": {"size": "tiny", "max_seq_len": 32},
        "data": {"demo_dir": str(demo), "eval_every_steps": 0},
        "train": {
            "steps": 200,
            "global_batch_tokens": 24 * 32,
            "micro_batch_size": 4,
            "seq_len": 32,
            "warmup_steps": 5,
            "log_sample_ids": True,
        },
    }
    doc["nodes"] = {"min": 1, "max": 3, **doc["nodes"]}
    return with_overrides(doc, overrides)


@dataclass
class Daemon:
    """One `elasticd run` process; its JSON lines go to ``log``."""

    name: str
    log: Path
    proc: subprocess.Popen[bytes]
    run_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[dict[str, Any]]:
        return read_lines(self.log)

    def events(self, name: str) -> list[dict[str, Any]]:
        return events(self.log, name)

    def steps(self) -> dict[int, dict[str, Any]]:
        return {int(r["step"]): r for r in self.events("step")}

    def states(self) -> list[str]:
        return [r["state"] for r in self.events("state")]

    def worker_pids(self) -> list[int]:
        started = self.events("workers_started")
        return list(started[-1]["pids"]) if started else []

    def http_port(self) -> int:
        return int(
            wait_for(
                lambda: self.events("http"), timeout_seconds=60, what=f"{self.name} http line"
            )[0]["port"]
        )

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.http_port()}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def metric(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` of the node's ``/metrics`` whose labels include ``labels``
        (``run_id`` and ``node`` need not be given); None when absent."""
        url = f"http://127.0.0.1:{self.http_port()}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode("utf-8")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    return float(sample.value)
        return None

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def kill_with_workers(self) -> None:
        """SIGKILL the daemon (its workers die with it: PR_SET_PDEATHSIG)."""
        self.proc.kill()

    def wait(self, timeout_seconds: float) -> int:
        return self.proc.wait(timeout=timeout_seconds)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        for pid in self.worker_pids():  # belt and braces: never leak a worker
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def start_daemon(
    config: Mapping[str, Any] | Path,
    *,
    name: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    sets: tuple[str, ...] = (),
    cwd: Path = REPO,
    prefix: tuple[str, ...] = (),
) -> Daemon:
    """``elasticd run`` in ``cwd``. With ``-P``, as the ``elasticd`` console script: the
    daemon's own imports never come from its working directory. ``prefix`` goes before the
    command line (``ip netns exec NS``: a program that execs it, keeping the pid)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = config if isinstance(config, Path) else write_config(log_dir / f"{name}.yaml", config)
    log = log_dir / f"{name}.log"
    args = [*prefix, sys.executable, "-P", "-m", "daemon.cli", "run", "--config", str(path)]
    args += ["--node-id", name]
    for item in sets:
        args += ["--set", item]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, cwd=cwd, env=base_env(env), stdout=out, stderr=subprocess.STDOUT
        )
    return Daemon(name, log, proc)


@contextlib.contextmanager
def daemons() -> Iterator[list[Daemon]]:
    """Collects started daemons and kills whatever is left at the end."""
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for daemon in started:
            daemon.stop()


def merged_steps(*group: Daemon) -> list[dict[str, Any]]:
    """Every step line of the run (rank 0 may move between nodes), in log order by time."""
    rows = [r for d in group for r in d.events("step")]
    return sorted(rows, key=lambda r: r["ts"])


def wait_world_size(
    group: list[Daemon], size: int, *, timeout_seconds: float, after_ts: float = 0.0
) -> dict[str, Any]:
    """The first step line at world size ``size`` with ``ts`` after ``after_ts`` (bounded)."""
    rows = wait_for(
        lambda: [r for r in merged_steps(*group) if r["ts"] > after_ts and r["world_size"] == size],
        timeout_seconds=timeout_seconds,
        what=f"a step at world size {size}",
    )
    return rows[0]  # type: ignore[no-any-return]


def wait_step(group: list[Daemon], step: int, *, timeout_seconds: float) -> None:
    wait_for(
        lambda: any(r["step"] >= step for r in merged_steps(*group)),
        timeout_seconds=timeout_seconds,
        what=f"step {step}",
    )


def last_step(group: list[Daemon]) -> int:
    rows = merged_steps(*group)
    return int(rows[-1]["step"]) if rows else 0


def now() -> float:
    return time.time()
