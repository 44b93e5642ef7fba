"""The job configuration document as the daemon sees it, resolved once in ``main()``.

The daemon types its own sections (``nodes``, ``watchdog``, ``drain``, ``metrics``) and the
``elastic`` ones it acts on (``etcd``, ``checkpoint``, ``guard``, ``rewind``, ``faults``). The
workload sections (``model``, ``data``, ``train``) belong to the ``model`` package, which the
daemon never imports: it validates them by running ``python -m model.config --check`` on the
resolved document, which it then writes to the run directory for its workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from elastic.checkpoint.config import CheckpointConfig
from elastic.config import ConfigError, build, check, check_name, layered, to_dict
from elastic.faults import ALLOW_FAULTS_ENV, FaultConfig, require_permission
from elastic.files import replace_file
from elastic.guard import validate_retention
from elastic.guard.config import GuardConfig, RewindConfig
from elastic.rendezvous import EtcdConfig


@dataclass(frozen=True)
class NodesConfig:
    """YAML section ``nodes``: the elastic range of the group and how rounds form."""

    min: int = 1
    max: int = 1
    address: str = ""  # how other nodes reach this one (default: the host's FQDN)
    last_call_seconds: float = 3.0  # after min nodes joined, wait this long for more (up to max)
    join_timeout_seconds: float = 60.0  # a round not formed by then -> state waiting, retry
    keep_alive_seconds: float = 1.0  # rendezvous heartbeat; a node missing
    keep_alive_max_missed: int = 3  # this many heartbeats is dropped from the next round
    # While a round forms, re-read its state this often (torch's own wait is 1 s; every wait
    # adds to the training pause of a resize or restart). One small etcd read per node.
    poll_seconds: float = 0.1

    def __post_init__(self) -> None:
        check(self.min >= 1, "min", self.min, "must be >= 1")
        check(self.max >= self.min, "max", self.max, f"must be >= nodes.min ({self.min})")
        for key in (
            "last_call_seconds",
            "join_timeout_seconds",
            "keep_alive_seconds",
            "poll_seconds",
        ):
            check(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        check(
            self.keep_alive_max_missed >= 1,
            "keep_alive_max_missed",
            self.keep_alive_max_missed,
            "must be >= 1",
        )


@dataclass(frozen=True)
class WatchdogConfig:
    """YAML section ``watchdog``: hang detection and the crash-loop budget."""

    timeout_seconds: float = 60.0  # no step progress for this long -> restart (reason hang)
    startup_timeout_seconds: float = 300.0  # allowance for start-up and checkpoint load
    max_restarts: int = 10  # restarts allowed per window before the run is marked failed
    restart_window_seconds: float = 600.0
    poll_seconds: float = 0.5  # how often the daemon looks at its workers
    # Worker processes kept warm (torch imported) for this many next rounds, nproc_per_node
    # each: a restart or resize that finds none pays the imports (seconds) in its pause.
    standby_rounds: int = 2

    def __post_init__(self) -> None:
        for key in ("timeout_seconds", "startup_timeout_seconds", "restart_window_seconds"):
            value = getattr(self, key)
            check(value > 0, key, value, "must be > 0")
        check(self.max_restarts >= 0, "max_restarts", self.max_restarts, "must be >= 0")
        check(self.standby_rounds >= 1, "standby_rounds", self.standby_rounds, "must be >= 1")
        check(0 < self.poll_seconds <= 5, "poll_seconds", self.poll_seconds, "must be in (0, 5]")


@dataclass(frozen=True)
class DrainConfig:
    """YAML section ``drain``: graceful leave on SIGTERM (pod deletion, preemption)."""

    timeout_seconds: float = 120.0  # checkpoint + clean exit must fit in this

    def __post_init__(self) -> None:
        check(self.timeout_seconds > 0, "timeout_seconds", self.timeout_seconds, "must be > 0")


@dataclass(frozen=True)
class MetricsConfig:
    """YAML section ``metrics``: the node's HTTP endpoint (/healthz /readyz /metrics)."""

    bind: str = "127.0.0.1"
    port: int = 9400  # 0 picks a free port (tests)

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "port", self.port, "must be in 0..65535")


@dataclass(frozen=True)
class DaemonConfig:
    """The whole document, daemon view."""

    run_id: str = "demo"
    run_dir: str = "./runs/demo"
    nodes: NodesConfig = field(default_factory=NodesConfig)
    nproc_per_node: int = 1
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    rewind: RewindConfig = field(default_factory=RewindConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    drain: DrainConfig = field(default_factory=DrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    faults: tuple[FaultConfig, ...] = ()
    # Workload sections, validated by `python -m model.config --check`.
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("run_id", self.run_id)
        check(self.nproc_per_node > 0, "nproc_per_node", self.nproc_per_node, "must be > 0")


def resolve(
    path: str | None, *, environ: Mapping[str, str], sets: Sequence[str] = ()
) -> tuple[DaemonConfig, dict[str, Any]]:
    """Validated config plus the merged document (for the workers), or ConfigError."""
    document = layered(path, environ=environ, sets=sets)
    config = build(DaemonConfig, document)
    require_permission(config.faults, environ)
    try:
        validate_retention(
            interval_steps=config.checkpoint.interval_steps,
            keep_last=config.checkpoint.keep_last,
            rewind=config.rewind,
            guard=config.guard,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    check_workload(document, environ=environ)
    return config, document


def check_workload(document: Mapping[str, Any], *, environ: Mapping[str, str]) -> None:
    """Run the workload's own validator on the document (one short subprocess, no torch)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(dict(document), fh)
        tmp = fh.name
    try:
        env = {k: v for k, v in environ.items() if not k.startswith("ELASTICD_")}
        env[ALLOW_FAULTS_ENV] = environ.get(ALLOW_FAULTS_ENV, "")
        proc = subprocess.run(
            [sys.executable, "-m", "model.config", "--config", tmp, "--check"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
    finally:
        os.unlink(tmp)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        raise ConfigError(lines[-1].removeprefix("elasticd: invalid config: "))


def write_resolved(config: DaemonConfig, document: Mapping[str, Any]) -> Path:
    """Write the resolved document (what every worker reads) into the run directory."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = dict(document)
    typed = to_dict(config)
    resolved.update({k: v for k, v in typed.items() if k not in ("model", "data", "train")})
    path = run_dir / "config.resolved.yaml"
    # Daemons that share a run directory (tests, a shared volume) each write it whole.
    replace_file(path, yaml.safe_dump(resolved, sort_keys=False).encode())
    return path
