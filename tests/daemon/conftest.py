"""Fixtures for the daemon tests: real etcd servers (tests/support/etcd.py)."""

from tests.support.etcd import etcd_factory, etcd_server

__all__ = ["etcd_factory", "etcd_server"]
