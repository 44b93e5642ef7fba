"""Loopback ports for the servers elasticd (and its tests) start as child processes.

A port found by binding port 0 comes from the kernel's ephemeral range, the same range every
outgoing connection takes its local port from; between the pick and the child's own bind, a
connection can take it ("address already in use"). ``free_port()`` picks at random below that
range instead, where only listeners that chose the number themselves can collide, and checks
that the port binds. It falls back to port 0 where the range leaves no room below it.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

LOWEST_PORT = 10000
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default when the range cannot be read
ATTEMPTS = 64


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def binds(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP listener could bind ``host:port`` right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that binds now and that no outgoing connection will take."""
    high = ephemeral_low()
    if high - LOWEST_PORT >= ATTEMPTS:
        for port in random.sample(range(LOWEST_PORT, high), ATTEMPTS):
            if binds(port, host):
                return port
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
