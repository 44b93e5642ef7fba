"""Fixtures for the examples' end-to-end tests: a real etcd server (tests/support/etcd.py)."""

from tests.support.etcd import etcd_server

__all__ = ["etcd_server"]
