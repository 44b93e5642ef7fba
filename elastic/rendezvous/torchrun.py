"""torchrun integration: ``--rdzv-backend etcd3`` through the ``torchrun.handlers`` entry point.

pyproject.toml declares ``etcd3 = "elastic.rendezvous.torchrun:handler_factory"``; torch's
registry calls ``handler_factory()`` and registers the result as the creator of handlers.

    torchrun --rdzv-backend etcd3 --rdzv-endpoint HOST:2379[,HOST2:2379] --rdzv-id JOB \\
             --nnodes 1:4 --rdzv-conf key_prefix=/jobs,tls_ca=/ca.pem,... train.py

``--rdzv-conf`` options (all optional): ``key_prefix``, ``node_ttl_seconds`` (lease TTL of this
agent's node record: a killed agent is out of the group this long after its last keep-alive,
default 10), ``ttl_seconds`` (lease TTL of the run's store keys and closed marker: an abandoned
run's keys go this long after the last write, default 7200), ``connect_timeout_seconds``,
``request_timeout_seconds``, ``tls_ca``, ``tls_cert``, ``tls_key``, ``user``, ``password``,
``allow_insecure_auth`` (``true``: accept user/password without TLS), and torch's
``join_timeout`` and ``last_call_timeout`` (seconds).

Accepted and ignored, so that existing command lines keep working: torchrun's generic
``timeout`` (as torch's c10d backend) and the knobs of torch's heartbeat algorithm, which this
backend does not run (``close_timeout``, ``heartbeat_timeout``, ``keep_alive_interval``,
``keep_alive_max_attempt``): node liveness is the node lease (``node_ttl_seconds``). Given ones
are named in one log line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from elastic import jsonlog
from elastic.config import ConfigError, build
from elastic.rendezvous.config import EtcdConfig, split_endpoints

if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous.api import RendezvousHandler, RendezvousParameters

    from elastic.rendezvous.handler import EtcdRendezvousHandler

log = jsonlog.get("elastic.rendezvous.torchrun")
CONNECTION_OPTIONS = {
    "key_prefix": "key_prefix",
    "node_ttl_seconds": "ttl_seconds",
    "ttl_seconds": "state_ttl_seconds",
    "connect_timeout_seconds": "connect_timeout_seconds",
    "request_timeout_seconds": "request_timeout_seconds",
    "tls_ca": "tls_ca",
    "tls_cert": "tls_cert",
    "tls_key": "tls_key",
    "user": "user",
    "password": "password",
    "allow_insecure_auth": "allow_insecure_auth",
}
TIMEOUT_OPTIONS = {
    "join_timeout": ("join_timeout_seconds", 600.0),
    "last_call_timeout": ("last_call_timeout_seconds", 30.0),
}
# torchrun's generic option, and torch's heartbeat algorithm's knobs (module docstring).
IGNORED_OPTIONS = frozenset(
    {
        "timeout",
        "close_timeout",
        "heartbeat_timeout",
        "keep_alive_interval",
        "keep_alive_max_attempt",
    }
)
_FLOAT_FIELDS = {
    "ttl_seconds",
    "state_ttl_seconds",
    "connect_timeout_seconds",
    "request_timeout_seconds",
}


def _number(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"rdzv_conf {key}={value!r}: must be a number") from None


def _flag(key: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text not in ("true", "1", "false", "0"):
        raise ValueError(f"rdzv_conf {key}={value!r}: must be true or false")
    return text in ("true", "1")


def config_from_params(params: RendezvousParameters) -> EtcdConfig:
    """``EtcdConfig`` from ``--rdzv-endpoint`` (comma separated) and ``--rdzv-conf``."""
    known = set(CONNECTION_OPTIONS) | set(TIMEOUT_OPTIONS) | IGNORED_OPTIONS
    unknown = sorted(set(params.config) - known)
    if unknown:
        raise ValueError(
            f"unknown rdzv_conf option(s) {', '.join(unknown)} for the etcd3 backend; "
            f"known: {', '.join(sorted(known))}"
        )
    endpoints = split_endpoints(params.endpoint or "")
    if not endpoints:
        raise ValueError("--rdzv-endpoint is required for the etcd3 backend (HOST:PORT[,...])")
    mapping: dict[str, Any] = {"endpoints": list(endpoints)}
    for option, field in CONNECTION_OPTIONS.items():
        if option in params.config:
            value = params.config[option]
            if field in _FLOAT_FIELDS:
                value = _number(option, value)
            elif field == "allow_insecure_auth":
                value = _flag(option, value)
            mapping[field] = value
    try:
        return build(EtcdConfig, mapping, path="rdzv_conf.")
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc


def create_torchrun_handler(params: RendezvousParameters) -> EtcdRendezvousHandler:
    """The creator torch's registry calls with torchrun's ``RendezvousParameters``."""
    # Imported here, not at the top: torch loads this entry point while its own rendezvous
    # package is still initialising (e.g. when ``elastic.rendezvous`` is imported first), and
    # the handler module needs that package complete.
    from elastic.rendezvous.handler import create_handler

    config = config_from_params(params)
    seconds = {
        field: _number(option, params.config.get(option, default))
        for option, (field, default) in TIMEOUT_OPTIONS.items()
    }
    ignored = sorted(IGNORED_OPTIONS & set(params.config) - {"timeout"})
    if ignored:
        log.info("rdzv_conf_ignored", options=ignored, reason="no heartbeats: node leases")
    return create_handler(
        config,
        run_id=params.run_id,
        min_nodes=params.min_nodes,
        max_nodes=params.max_nodes,
        local_addr=params.local_addr,
        join_timeout_seconds=seconds["join_timeout_seconds"],
        last_call_timeout_seconds=seconds["last_call_timeout_seconds"],
    )


def handler_factory() -> Callable[[RendezvousParameters], RendezvousHandler]:
    """Entry point of group ``torchrun.handlers``: returns the handler creator."""
    return create_torchrun_handler
