"""Which network interface carries ``nodes.address``: the workers' collectives bind to it.

gloo and NCCL pick an interface from the host name by default; where it resolves to loopback
(a bare VM, a container without DNS) or to the wrong NIC of a multi-homed host, peers on other
hosts cannot connect. When ``nodes.address`` is an IP address of this host, the daemon sets
``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` for its workers to that interface, unless the
job already sets them (``worker.env`` or the daemon's environment win). Linux only (ioctl
``SIOCGIFADDR``); elsewhere nothing is set.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Mapping

SIOCGIFADDR = 0x8915  # <linux/sockios.h>: an interface's IPv4 address
SOCKET_IFNAME_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_of(address: str) -> str | None:
    """The name of the interface holding IPv4 ``address`` on this host (None: not an IPv4
    address, or none of this host's interfaces has it)."""
    try:
        wanted = ipaddress.IPv4Address(address)
    except ValueError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            with contextlib.suppress(OSError):  # an interface without an IPv4 address
                reply = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
                if ipaddress.IPv4Address(reply[20:24]) == wanted:
                    return name
    return None


def socket_ifname_env(address: str, environ: Mapping[str, str]) -> dict[str, str]:
    """``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` for ``address``'s interface, leaving out
    any the job already sets in ``environ``."""
    name = interface_of(address) if address else None
    if name is None:
        return {}
    return {key: name for key in SOCKET_IFNAME_ENV if key not in environ}
