"""``EtcdConfig``: how to reach etcd and where this run's keys live (YAML section ``etcd``).

An empty ``endpoints`` tuple means "no external etcd": the daemon then starts an embedded one and
fills the endpoint in. Endpoints are ``host:port`` or ``http(s)://host:port``; a ``https`` scheme
or ``tls_ca`` turns TLS on, ``tls_cert``/``tls_key`` add a client certificate.

etcd's user/password go to the server in the clear, and its auth token in every request's
metadata: over an endpoint without TLS anyone on the path can replay them. A config with
``user``/``password`` and an endpoint without TLS is therefore refused unless
``allow_insecure_auth`` says so (the daemon then warns once at start). An empty ``endpoints``
(the embedded etcd, plain HTTP on loopback and without users) takes no credentials at all.
"""

from __future__ import annotations

import dataclasses
import math
import re

from elastic.config import NAME_RULE, check, is_name
from elastic.config import check_name as check_name  # the one naming rule, re-exported

DEFAULT_PORT = 2379
_ENDPOINT = re.compile(
    r"^(?:(?P<scheme>https?)://)?(?P<host>\[[0-9a-fA-F:.]+\]|[^:/\s]+)(?::(?P<port>\d{1,5}))?/?$"
)


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One etcd client URL, parsed."""

    host: str
    port: int
    scheme: str | None  # None: decided by whether TLS files are configured

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``"10.0.0.1:2379"``, ``"https://etcd:2379"`` -> Endpoint; ValueError when malformed."""
    match = _ENDPOINT.match(text.strip())
    if not match or not text.isascii():
        raise ValueError(f"{text!r} is not host:port or http(s)://host:port")
    port = int(match["port"]) if match["port"] else DEFAULT_PORT
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port must be in 1..65535")
    return Endpoint(host=match["host"].strip("[]"), port=port, scheme=match["scheme"])


def split_endpoints(text: str) -> tuple[str, ...]:
    """``"a:2379, b:2379"`` -> ``("a:2379", "b:2379")`` (torchrun's ``--rdzv-endpoint``)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class EtcdConfig:
    """Connection and key-layout settings shared by the daemon, elasticctl and torchrun."""

    # Client URLs; several give failover. Empty: the daemon starts an embedded etcd.
    endpoints: tuple[str, ...] = ()
    # Every key of every run lives under this prefix: <key_prefix>/<run_id>/...
    key_prefix: str = "/elasticd"
    # Node lease TTL: a node that stops sending keep-alives is gone after this long.
    ttl_seconds: float = 10.0
    # Lease TTL of torchrun's per-round store keys and closed marker (abandoned runs expire).
    state_ttl_seconds: float = 7200.0
    # How long one operation keeps retrying (across endpoints) before EtcdUnavailableError.
    connect_timeout_seconds: float = 5.0
    # Deadline of one gRPC call.
    request_timeout_seconds: float = 5.0
    # PEM files: CA to trust, and a client certificate and key for mutual TLS.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # etcd authentication (both or neither).
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False, metadata={"secret": True})
    # Accept user/password over an endpoint without TLS (they and the token travel readable).
    allow_insecure_auth: bool = False

    def __post_init__(self) -> None:
        check(isinstance(self.endpoints, tuple), "endpoints", self.endpoints, "must be a list")
        for i, endpoint in enumerate(self.endpoints):
            try:
                parse_endpoint(endpoint)
            except ValueError as exc:
                check(False, f"endpoints[{i}]", endpoint, str(exc))
        segments = self.key_prefix.split("/")
        prefix_ok = len(segments) > 1 and segments[0] == "" and all(map(is_name, segments[1:]))
        rule = f"must be /NAME or /NAME/NAME..., a NAME {NAME_RULE}"
        check(prefix_ok, "key_prefix", self.key_prefix, rule)
        check(self.ttl_seconds >= 1, "ttl_seconds", self.ttl_seconds, "must be >= 1")
        check(
            self.state_ttl_seconds >= 1, "state_ttl_seconds", self.state_ttl_seconds, "must be >= 1"
        )
        for key in ("connect_timeout_seconds", "request_timeout_seconds"):
            check(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        paired = (self.tls_cert is None) == (self.tls_key is None)
        given = ("tls_cert", self.tls_cert) if self.tls_key is None else ("tls_key", self.tls_key)
        check(paired, *given, "tls_cert and tls_key must be given together")
        paired = (self.user is None) == (self.password is None)
        check(paired, "user", self.user, "user and password must be given together")
        self._check_auth_transport()

    def _check_auth_transport(self) -> None:
        if self.user is None:
            return
        check(self.user != "", "user", self.user, "must not be empty (leave user out: no auth)")
        check(self.password != "", "password", self.password, "must not be empty")
        check(
            bool(self.endpoints),
            "user",
            self.user,
            "needs etcd endpoints: the embedded etcd (endpoints: []) has no users",
        )
        plaintext = self.plaintext_endpoints
        if plaintext and not self.allow_insecure_auth:
            check(
                False,
                "allow_insecure_auth",
                self.allow_insecure_auth,
                f"user/password would go to {plaintext[0]!r} without TLS; "
                "use https:// or tls_ca, or set allow_insecure_auth: true",
            )

    @property
    def lease_ttl(self) -> int:
        """Node lease TTL in whole seconds, as etcd grants them."""
        return max(1, math.ceil(self.ttl_seconds))

    @property
    def state_lease_ttl(self) -> int:
        return max(1, math.ceil(self.state_ttl_seconds))

    @property
    def uses_tls(self) -> bool:
        schemes = {parse_endpoint(e).scheme for e in self.endpoints}
        return self.tls_ca is not None or self.tls_cert is not None or "https" in schemes

    def secure(self, endpoint: Endpoint) -> bool:
        """Whether the client talks TLS to ``endpoint``: ``https://``, or no scheme and TLS
        configured (``tls_ca``/``tls_cert``, or another endpoint's ``https://``)."""
        return endpoint.scheme == "https" or (endpoint.scheme is None and self.uses_tls)

    @property
    def plaintext_endpoints(self) -> tuple[str, ...]:
        """The endpoints the client reaches without TLS."""
        return tuple(e for e in self.endpoints if not self.secure(parse_endpoint(e)))

    @property
    def insecure_auth(self) -> bool:
        """User/password go over an endpoint without TLS (only with ``allow_insecure_auth``)."""
        return self.user is not None and bool(self.plaintext_endpoints)
