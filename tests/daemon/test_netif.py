"""daemon/netif.py: the interface that holds nodes.address, for the workers' collectives."""

from __future__ import annotations

import socket

from daemon.netif import interface_of, socket_ifname_env


def loopback_name() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next(n for n in names if n.startswith("lo"))


def test_the_loopback_address_is_found_on_the_loopback_interface() -> None:
    assert interface_of("127.0.0.1") == loopback_name()


def test_addresses_of_no_interface_and_host_names_give_none() -> None:
    assert interface_of("198.18.255.254") is None  # not configured on this host
    assert interface_of("node-a.example") is None  # a name, not an address
    assert interface_of("") is None


def test_the_jobs_own_setting_wins_and_unknown_addresses_set_nothing() -> None:
    lo = loopback_name()
    assert socket_ifname_env("127.0.0.1", {}) == {
        "GLOO_SOCKET_IFNAME": lo,
        "NCCL_SOCKET_IFNAME": lo,
    }
    assert socket_ifname_env("127.0.0.1", {"NCCL_SOCKET_IFNAME": "ib0"}) == {
        "GLOO_SOCKET_IFNAME": lo
    }
    assert socket_ifname_env("198.18.255.254", {}) == {}
    assert socket_ifname_env("", {}) == {}
