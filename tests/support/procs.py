"""Start real processes for end-to-end tests and read their JSON lines with bounded waits."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def elasticctl(
    *args: str, env: Mapping[str, str] | None = None, timeout_seconds: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``elasticctl`` (``python -m ops.cli``) from the repository root, bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        cwd=REPO,
        env=base_env(env),
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        check=False,
    )


def write_config(path: Path, document: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False), encoding="utf-8")
    return path


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICD_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.update(extra or {})
    return env


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every JSON object line of a log file (other lines are skipped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def events(path: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in read_lines(path) if r.get("event") == name]


def wait_for(
    condition: Callable[[], Any], *, timeout_seconds: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``condition`` until truthy; fail the test with ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_seconds:.0f} s waiting for {what}")


@dataclass
class WorkerGroup:
    """``world_size`` ``python -m model.train`` processes on loopback, logs in files."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def rank0_log(self) -> Path:
        return self.logs[0]

    def wait(self, timeout_seconds: float) -> list[int]:
        deadline = time.monotonic() + timeout_seconds
        codes = []
        for proc in self.procs:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                codes.append(proc.wait(timeout=remaining))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"workers did not finish in {timeout_seconds} s; log tail: "
                    + self.rank0_log.read_text()[-2000:]
                ) from None
        return codes

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def launch(
    config: Path,
    *,
    world_size: int,
    log_dir: Path,
    sets: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> WorkerGroup:
    """Start a gloo group of ``python -m model.train`` workers (torch elastic env contract)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    group = WorkerGroup()
    for rank in range(world_size):
        log = log_dir / f"rank{rank}.log"
        worker_env = base_env(env)
        worker_env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        args = [sys.executable, "-m", "model.train", "--config", str(config)]
        for item in sets:
            args += ["--set", item]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args,
                cwd=REPO,
                env=worker_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        group.procs.append(proc)
        group.logs.append(log)
    return group


@contextlib.contextmanager
def running(
    config: Path,
    *,
    world_size: int,
    log_dir: Path,
    sets: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[WorkerGroup]:
    group = launch(config, world_size=world_size, log_dir=log_dir, sets=sets, env=env)
    try:
        yield group
    finally:
        group.kill()


def step_losses(path: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in events(path, "step")}
