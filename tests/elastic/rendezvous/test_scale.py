"""8 to 64 participants (threads, one etcd client each) complete one round at max_nodes; times are
printed, not asserted (the machine is shared)."""

from __future__ import annotations

import time

import pytest

from elastic.rendezvous import connect, create_handler
from tests.elastic.rendezvous.conftest import etcd_config, form_round
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("num_nodes", [8, 16, 32, 64])
def test_every_participant_completes_one_round(
    etcd_server: EtcdServer, run_id: str, num_nodes: int
) -> None:
    config = etcd_config(etcd_server, connect_timeout_seconds=10.0, request_timeout_seconds=10.0)
    clients = [connect(config) for _ in range(num_nodes)]
    handlers = [
        create_handler(
            client,
            run_id=run_id,
            min_nodes=num_nodes,
            max_nodes=num_nodes,
            local_addr="127.0.0.1",
            join_timeout_seconds=120,
            last_call_timeout_seconds=1,
        )
        for client in clients
    ]
    started = time.monotonic()
    try:
        results = form_round(handlers, timeout_seconds=180)
        elapsed = time.monotonic() - started
    finally:
        for handler in handlers:
            handler.shutdown()
        for client in clients:
            client.close()
    assert sorted(results) == [(rank, num_nodes) for rank in range(num_nodes)]  # type: ignore[type-var]
    print(f"\nrendezvous of {num_nodes} participants: {elapsed:.2f} s")
