"""The job configuration document as the daemon sees it, resolved once in ``main()``.

The daemon types its own sections (``nodes``, ``watchdog``, ``drain``, ``metrics``,
``worker``, ``stragglers``) and the ``elastic`` ones it acts on (``etcd``, ``checkpoint``,
``guard``, ``rewind``, ``faults``). The workload sections (``model``, ``data``, ``train``)
belong to the training loop. For the bundled trainer (``worker.command`` left at its default)
the daemon, which never imports ``model``, validates them by running
``python -m model.config --check`` on the resolved document; for any other command it checks
only that the command can start (the script or program exists). The resolved document goes to
the run directory for the workers.

Bad input is refused before anything is written, in one line naming the key and the value
(exit code 2): :func:`resolve` checks the document, :func:`check_start` what this node needs
to start it (TLS files readable, the metrics address bindable, the run directory creatable).

Secrets: :data:`SECRETS` is the one list of keys whose values are secret. None of them goes
into a fingerprint (:mod:`daemon.identity`) or etcd. ``config.resolved.yaml`` is the workers'
whole config (they get no ``ELASTICD_*`` environment), so it keeps the storage credentials they
need; it is created mode 0600 and its first line says it holds secrets. ``etcd.password``, which
only the daemon uses, is written as ``<redacted>``.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.http import probe_bind
from daemon.stragglers import StragglersConfig
from elastic.checkpoint.config import CheckpointConfig
from elastic.config import (
    ConfigError,
    build,
    check,
    check_creatable_dir,
    check_name,
    check_regular_file,
    layered,
    to_dict,
)
from elastic.faults import FaultConfig, require_permission
from elastic.files import replace_file
from elastic.guard.config import GuardConfig, RewindConfig
from elastic.protocol import Env
from elastic.rendezvous import EtcdConfig

RESOLVED_NAME = "config.resolved.yaml"
RESOLVED_MODE = 0o600  # it holds the storage credentials the workers need
REDACTED = "<redacted>"
DEFAULT_COMMAND = ("{python}", "-P", "-m", "model.train", "--config", "{config}")
PLACEHOLDERS = frozenset({"python", "config"})
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PYTHON_NAMES = frozenset({"{python}", "python", "python3"})
_PYTHON_FLAGS_WITH_ARG = frozenset({"-X", "-W"})


@dataclass(frozen=True)
class Secret:
    """A config key whose value is secret (a mapping key: every value under it)."""

    key: str  # dotted path
    in_resolved_file: bool  # config.resolved.yaml keeps it (else: written as REDACTED)


# The one list of secret keys. A key naming a file that holds a secret (etcd.tls_key) is not
# one: the path reveals nothing and the file keeps its own permissions.
SECRETS: tuple[Secret, ...] = (
    # Only the daemon talks to etcd; usually set from a Kubernetes Secret through
    # ELASTICD_ETCD__PASSWORD, so writing it would copy it onto a volume.
    Secret("etcd.password", in_resolved_file=False),
    # The workers read these from the file (they get no ELASTICD_* environment).
    Secret("checkpoint.storage_options", in_resolved_file=True),  # fsspec key/secret/token
    Secret("data.storage_options", in_resolved_file=True),
    # The record of what the workers' environment got (tokens for the loop); settable only in
    # the YAML or with --set, never through the environment, so already in the user's file.
    Secret("worker.env", in_resolved_file=True),
)


# A round record lists every participant in one etcd value: with names of ~20 characters
# 65,536 fit under etcd's default 1.5 MiB request limit (the chart checks its own etcd).
MAX_NODES = 65536
# One worker per GPU (8 on today's largest nodes) or, for CPU runs, per core: the largest
# two-socket hosts have 384 cores. Each worker is a process with torch loaded (~0.3 GB) and
# the standby pool keeps up to MAX_STANDBY_ROUNDS more sets warm; past this it is a typo.
MAX_NPROC_PER_NODE = 1024
# Warm worker sets for the next restarts or resizes: a round takes one, the pool refills it
# in the background, so more than a few are memory spent on nothing.
MAX_STANDBY_ROUNDS = 8


@dataclass(frozen=True)
class NodesConfig:
    """YAML section ``nodes``: the elastic range of the group and how rounds form."""

    min: int = 1
    max: int = 1
    address: str = ""  # how other nodes reach this one (default: the host's FQDN)
    last_call_seconds: float = 3.0  # after min nodes joined, wait this long for more (up to max)
    join_timeout_seconds: float = 60.0  # a round not formed by then -> state waiting, retry
    # Liveness is the node lease (etcd.ttl_seconds); rounds are watched, not polled: the
    # rendezvous heartbeat and poll keys of torch's algorithm are gone (docs/rendezvous.md).

    def __post_init__(self) -> None:
        check(self.min >= 1, "min", self.min, "must be >= 1")
        check(self.max >= self.min, "max", self.max, f"must be >= nodes.min ({self.min})")
        check(self.max <= MAX_NODES, "max", self.max, f"must be <= {MAX_NODES}")
        for key in ("last_call_seconds", "join_timeout_seconds"):
            value = getattr(self, key)
            check(0 < value < math.inf, key, value, "must be > 0 and finite")


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
        check(
            1 <= self.standby_rounds <= MAX_STANDBY_ROUNDS,
            "standby_rounds",
            self.standby_rounds,
            f"must be in 1..{MAX_STANDBY_ROUNDS}",
        )
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
class WorkerConfig:
    """YAML section ``worker``: what each worker process runs, and how it is watched before it
    speaks the protocol (a loop without the worker API never writes a heartbeat)."""

    command: tuple[str, ...] = DEFAULT_COMMAND
    """The worker's command line. ``{python}`` is the daemon's interpreter, ``{config}`` the
    absolute path of ``<run_dir>/config.resolved.yaml``. The default runs the bundled trainer."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of every worker, over the daemon's own; the torch elastic variables
    (``RANK``, ``WORLD_SIZE``, ...) and ``ELASTICD_WORKER_*`` win over these."""
    cwd: str = ""
    """Working directory of the workers (and of a relative script path); "" = the daemon's."""
    silence_timeout_seconds: float = 0.0
    """Restart (reason ``hang``) when a round's workers wrote no heartbeat yet and none of the
    node's workers printed a line for this long, once one has printed; 0 = off."""

    def __post_init__(self) -> None:
        command = list(self.command)
        check(bool(command), "command", command, "must be a non-empty list")
        ok = all(isinstance(a, str) and a for a in command)
        check(ok, "command", command, "items must be non-empty strings")
        unknown = sorted({n for a in command for n in _PLACEHOLDER.findall(a)} - PLACEHOLDERS)
        check(not unknown, "command", command, f"unknown placeholder {{{(unknown or [''])[0]}}}")
        for name, value in self.env.items():
            ok = bool(name) and "=" not in name
            check(ok, "env", self.env, f"variable name {name!r} must be non-empty, without '='")
            check(isinstance(value, str), f"env.{name}", value, "must be a string")
        check(isinstance(self.cwd, str), "cwd", self.cwd, "must be a string")
        timeout = self.silence_timeout_seconds
        check(timeout >= 0, "silence_timeout_seconds", timeout, "must be >= 0 (0 = off)")

    def argv(self, *, python: str, config_path: str) -> tuple[str, ...]:
        """The command with its placeholders filled in."""
        values = {"python": python, "config": config_path}
        return tuple(_PLACEHOLDER.sub(lambda m: values[m.group(1)], a) for a in self.command)


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
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    stragglers: StragglersConfig = field(default_factory=StragglersConfig)
    faults: tuple[FaultConfig, ...] = ()
    # Workload sections, validated by `python -m model.config --check` (default command only).
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("run_id", self.run_id)
        check(bool(self.run_dir), "run_dir", self.run_dir, "must not be empty")
        check(
            0 < self.nproc_per_node <= MAX_NPROC_PER_NODE,
            "nproc_per_node",
            self.nproc_per_node,
            f"must be in 1..{MAX_NPROC_PER_NODE}",
        )


def resolve(
    path: str | None, *, environ: Mapping[str, str], sets: Sequence[str] = ()
) -> tuple[DaemonConfig, dict[str, Any]]:
    """Validated config plus the merged document (for the workers), or ConfigError."""
    document = layered(path, environ=environ, sets=sets)
    return check_document(document, environ=environ), document


def resolve_to_start(
    path: str | None,
    *,
    environ: Mapping[str, str],
    sets: Sequence[str] = (),
    node_id: str | None = None,
) -> tuple[DaemonConfig, dict[str, Any]]:
    """What ``elasticd run`` refuses before it writes anything: :func:`resolve` and
    :func:`check_start`, this node's quick checks before the workload check's subprocess."""
    document = layered(path, environ=environ, sets=sets)
    config = check_document(document, environ=environ, workload=False)
    check_start(config, node_id=node_id)
    _check_workload_of(config, document, environ=environ)
    return config, document


def check_document(
    document: Mapping[str, Any], *, environ: Mapping[str, str], workload: bool = True
) -> DaemonConfig:
    """The typed config of ``document``, or ConfigError: every section, fault permission, the
    worker command, and (``workload`` and the bundled trainer) the workload."""
    config = build(DaemonConfig, document)
    require_permission(config.faults, environ)
    check_command(config.worker, environ=environ)
    if workload:
        _check_workload_of(config, document, environ=environ)
    return config


def _check_workload_of(
    config: DaemonConfig, document: Mapping[str, Any], *, environ: Mapping[str, str]
) -> None:
    """The bundled trainer's sections are checked by its own validator; another command's
    workload is its own business (its script or program was found by check_command)."""
    if config.worker.command == DEFAULT_COMMAND:
        check_workload(document, environ=environ)


def check_start(config: DaemonConfig, *, node_id: str | None = None) -> None:
    """What this node needs to start ``config``, known before start (ConfigError naming the
    key): the node id, the etcd TLS files, the metrics address (bound and closed again), the
    run directory and a local checkpoint directory (creatable; nothing is created)."""
    try:
        if node_id is not None:
            check_name("--node-id", node_id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for key in ("tls_ca", "tls_cert", "tls_key"):
        value = getattr(config.etcd, key)
        if value is not None:
            check_regular_file(f"etcd.{key}", value)
    _check_bindable(config.metrics)
    check_creatable_dir("run_dir", config.run_dir)
    local = _local_path(config.checkpoint.url)
    if local is not None:
        check_creatable_dir("checkpoint.url", config.checkpoint.url, local)


def _check_bindable(metrics: MetricsConfig) -> None:
    where = f"{metrics.bind}:{metrics.port}"
    try:
        probe_bind(metrics.bind, metrics.port)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"metrics.bind={metrics.bind!r}: cannot resolve it ({reason})") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            named = f"metrics.port={metrics.port}"
        else:
            named = f"metrics.bind={metrics.bind!r}"
        raise ConfigError(f"{named}: cannot bind {where} ({reason})") from None


def _local_path(url: str) -> str | None:
    """The directory of a local checkpoint URL (a plain path or ``file://``), else None."""
    if url.startswith("file://"):
        return url.removeprefix("file://")
    if "://" in url or "::" in url:
        return None
    return url


def resolved_path(config: DaemonConfig) -> str:
    """Absolute path of the resolved document: workers may run in another directory."""
    return os.path.abspath(os.path.join(config.run_dir, RESOLVED_NAME))


def check_command(worker: WorkerConfig, *, environ: Mapping[str, str]) -> None:
    """The worker's directory, and its script or program, exist on this node (ConfigError).

    Here, not in ``WorkerConfig``: the config is also read where workers never run
    (``elasticctl --config``), and that must not depend on this node's files.
    """
    cwd = Path(worker.cwd or os.getcwd())
    if worker.cwd and not cwd.is_dir():
        raise ConfigError(f"worker.cwd={worker.cwd!r}: not an existing directory")
    command = list(worker.command)
    if command[0] in _PYTHON_NAMES:
        script = _python_script(command)
        if script is not None and not (cwd / script).is_file():
            raise ConfigError(f"worker.command={command!r}: script {script!r} not found")
    elif not _PLACEHOLDER.fullmatch(command[0]):
        program = command[0]
        search = worker.env.get("PATH", environ.get("PATH", os.defpath))
        if os.sep in program:
            found = (cwd / program).is_file()
        else:
            found = shutil.which(program, path=search) is not None
        if not found:
            raise ConfigError(f"worker.command={command!r}: program {program!r} not found")


def _python_script(command: Sequence[str]) -> str | None:
    """The script a ``python [flags] SCRIPT ...`` command runs (None for -m, -c, or none)."""
    rest = list(command[1:])
    while rest and rest[0].startswith("-"):
        flag = rest.pop(0)
        if flag in ("-m", "-c") or flag.startswith(("-m", "-c")):
            return None
        if flag in _PYTHON_FLAGS_WITH_ARG and rest:
            rest.pop(0)
    if not rest or _PLACEHOLDER.search(rest[0]):
        return None
    return rest[0]


def check_workload(document: Mapping[str, Any], *, environ: Mapping[str, str]) -> None:
    """Run the workload's own validator on the document (one short subprocess, no torch)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(dict(document), fh)
        tmp = fh.name
    try:
        env = {k: v for k, v in environ.items() if not k.startswith("ELASTICD_")}
        env[Env.ALLOW_FAULTS] = environ.get(Env.ALLOW_FAULTS, "")
        proc = subprocess.run(
            # -P: a model.py in the working directory must not shadow the bundled package.
            [sys.executable, "-P", "-m", "model.config", "--config", tmp, "--check"],
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
    """Write the resolved document (what every worker reads) into the run directory: mode 0600
    from its creation, the daemon-only secrets redacted (module docstring)."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = dict(document)
    typed = to_dict(config)
    resolved.update({k: v for k, v in typed.items() if k not in ("model", "data", "train")})
    resolved = redacted(resolved, [s.key for s in SECRETS if not s.in_resolved_file])
    text = resolved_header() + yaml.safe_dump(resolved, sort_keys=False)
    path = run_dir / RESOLVED_NAME
    # Daemons that share a run directory (tests, a shared volume) each write it whole.
    replace_file(path, text.encode(), mode=RESOLVED_MODE)
    return path


def resolved_header() -> str:
    """The comment that opens config.resolved.yaml: who may read it, and why."""
    kept = ", ".join(s.key for s in SECRETS if s.in_resolved_file)
    gone = ", ".join(s.key for s in SECRETS if not s.in_resolved_file)
    return (
        f"# SECRETS: mode {RESOLVED_MODE:o}, owner only. elasticd's resolved job config for its "
        f"workers; it holds {kept} as given.\n"
        f"# {gone}: written as {REDACTED} (only the daemon uses it).\n"
    )


def without_secrets(document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` without the :data:`SECRETS` keys (what fingerprints hash)."""
    out = dict(document)
    for secret in SECRETS:
        out = _at(out, secret.key.split("."), lambda parent, leaf: parent.pop(leaf, None))
    return out


def redacted(document: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """A copy of ``document`` with the values at ``keys`` (every value under a mapping there)
    replaced by :data:`REDACTED`; absent and ``None`` values stay as they are."""

    def redact(parent: dict[str, Any], leaf: str) -> None:
        if parent.get(leaf) is not None:
            parent[leaf] = _redact_value(parent[leaf])

    out = dict(document)
    for key in keys:
        out = _at(out, key.split("."), redact)
    return out


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _redact_value(v) for k, v in value.items()}
    return REDACTED


def _at(
    document: dict[str, Any], parts: Sequence[str], edit: Callable[[dict[str, Any], str], object]
) -> dict[str, Any]:
    """``document`` with ``edit(parent, leaf)`` applied to copies along ``parts``; mappings
    not on the path are shared, not copied (the caller's document is never changed)."""
    head, rest = parts[0], parts[1:]
    out = dict(document)
    if not rest:
        edit(out, head)
    elif isinstance(out.get(head), Mapping):
        out[head] = _at(dict(out[head]), rest, edit)
    return out


def security_warnings(config: DaemonConfig) -> tuple[str, ...]:
    """Lines the daemon logs once at start: settings that are allowed but weaken security."""
    etcd = config.etcd
    if etcd.allow_insecure_auth and etcd.insecure_auth:
        return (
            f"etcd.allow_insecure_auth=true: etcd user/password go to "
            f"{', '.join(etcd.plaintext_endpoints)} without TLS",
        )
    return ()
