"""A multi-host test bed on one machine: network namespaces joined by a bridge (root only).

:class:`TestNet` owns one bed: a namespace holding only a bridge, and one namespace per host
(a node, etcd), each with loopback up and one interface ``eth0`` holding its own address from
198.18.0.0/15 (the benchmarking range, never routed), cabled to the bridge by a veth pair whose
bridge end lives in the bridge namespace. Nothing is added to the root namespace but the
namespaces' names, unique per bed (``eb<pid>x<n>-...``), so beds never collide, and there are
no routes out: traffic stays between the bed's namespaces.

Faults, each undone by its inverse: :meth:`TestNet.cut` / :meth:`TestNet.heal` take the host's
cable down / up at the bridge (the host sees no carrier; its packets go nowhere, silently, as in
a real partition); :meth:`TestNet.block` / :meth:`TestNet.unblock` add / remove a blackhole route
to one address inside the host (it loses that peer only, everyone else still reaches it).

A process runs in a host with ``host.wrap(argv)`` (``ip netns exec NS argv...``: the exec'd
program keeps the Popen's pid). :meth:`TestNet.close` kills whatever still runs in the bed's
namespaces and deletes them; the ``testnet`` fixture calls it whatever happened.
:class:`NetnsEtcd` is :class:`tests.support.etcd.EtcdServer` inside a host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.etcd import EtcdServer, etcd_binary

SUBNET = ipaddress.ip_network("198.18.0.0/24")  # inside 198.18.0.0/15 (RFC 2544)
IFNAME = "eth0"  # every host's one interface (GLOO_SOCKET_IFNAME)
IP_TIMEOUT_SECONDS = 10.0
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
_counter = itertools.count()


def unavailable_reason() -> str | None:
    """Why this machine cannot build a bed (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"eb{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.decode(errors='replace').strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def ip(*args: str) -> None:
    """``ip args...``; raise with its stderr when it fails."""
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_SECONDS, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    """One namespace of the bed, reachable at ``address``."""

    name: str
    netns: str
    address: str
    cable: str  # the veth end in the bridge namespace

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]


class TestNet:
    """One bed: a bridge namespace and host namespaces; see the module docstring."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self) -> None:
        self.tag = f"eb{os.getpid()}x{next(_counter)}"
        self.bridge_netns = f"{self.tag}-br"
        self.hosts: dict[str, Host] = {}
        self._netns: list[str] = []
        self._addresses = SUBNET.hosts()
        next(self._addresses)  # .1 stays free (a gateway's, by habit)
        self._add_netns(self.bridge_netns)
        ip("-n", self.bridge_netns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_netns, "link", "set", "br0", "up")

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._netns.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """A new namespace cabled to the bridge, with the next free address."""
        host = Host(
            name=name,
            netns=f"{self.tag}-{name}",
            address=str(next(self._addresses)),
            cable=f"v-{name}"[:15],
        )
        self._add_netns(host.netns)
        br = ("-n", self.bridge_netns)
        ip(
            *br,
            "link",
            "add",
            host.cable,
            "type",
            "veth",
            "peer",
            "name",
            IFNAME,
            "netns",
            host.netns,
        )
        ip(*br, "link", "set", host.cable, "master", "br0", "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/{SUBNET.prefixlen}", "dev", IFNAME)
        ip("-n", host.netns, "link", "set", IFNAME, "up")
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Partition ``host`` from everyone: its cable goes down at the bridge."""
        ip("-n", self.bridge_netns, "link", "set", host.cable, "down")

    def heal(self, host: Host) -> None:
        ip("-n", self.bridge_netns, "link", "set", host.cable, "up")

    def block(self, host: Host, address: str) -> None:
        """``host`` can no longer reach ``address`` (a blackhole route inside ``host``)."""
        ip("-n", host.netns, "route", "add", "blackhole", f"{address}/32")

    def unblock(self, host: Host, address: str) -> None:
        ip("-n", host.netns, "route", "del", "blackhole", f"{address}/32")

    def pids(self, netns: str) -> list[int]:
        proc = subprocess.run(
            ["ip", "netns", "pids", netns],
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT_SECONDS,
            check=False,
        )
        return [int(p) for p in proc.stdout.split()]

    def close(self) -> None:
        """Kill what still runs in the bed (only processes in its namespaces), delete them."""
        for netns in reversed(self._netns):
            for pid in self.pids(netns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                ip("netns", "del", netns)
        self._netns.clear()


@pytest.fixture
def testnet() -> Iterator[TestNet]:
    """A fresh bed, deleted at teardown however the test ended; skips where none can exist."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host test bed unavailable: {reason}")
    net = TestNet()
    try:
        yield net
    finally:
        net.close()


class NetnsEtcd(EtcdServer):
    """A single-member etcd inside ``host``, serving on the host's address."""

    def __init__(self, base_dir: Path, *, host: Host) -> None:
        super().__init__(base_dir, name=host.name)
        self.host = host
        self.client_port = ETCD_CLIENT_PORT  # a fresh namespace: every port is free
        self.peer_port = ETCD_PEER_PORT

    @property
    def endpoint(self) -> str:
        return f"{self.host.address}:{self.client_port}"

    def _command(self) -> list[str]:
        peer_url = f"http://{self.host.address}:{self.peer_port}"
        command = super()._command()
        for flag in ("--listen-peer-urls", "--initial-advertise-peer-urls"):
            command = [f"{flag}={peer_url}" if a.startswith(f"{flag}=") else a for a in command]
        command = [
            f"--initial-cluster={self.name}={peer_url}" if a.startswith("--initial-cluster=") else a
            for a in command
        ]
        return self.host.wrap(command)

    def healthy(self) -> bool:
        """etcdctl from inside the host (the test process is not on the bed's network)."""
        etcdctl = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
        argv = [etcdctl, f"--endpoints={self.url}", "--command-timeout=1s", "endpoint", "health"]
        try:
            proc = subprocess.run(self.host.wrap(argv), capture_output=True, timeout=5, check=False)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0
