"""etcd outages: restart under a formed group, a long outage, failover across endpoints."""

from __future__ import annotations

import time

import pytest
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

from daemon.ports import free_port
from elastic.rendezvous import EtcdUnavailableError, connect, create_handler
from elastic.rendezvous.handler import EtcdRendezvousHandler
from tests.elastic.rendezvous.conftest import etcd_config, form_round
from tests.support.etcd import EtcdFactory


def quick_handler(config: object, run_id: str, *, num_nodes: int) -> EtcdRendezvousHandler:
    return create_handler(
        config,  # type: ignore[arg-type]
        run_id=run_id,
        min_nodes=num_nodes,
        max_nodes=num_nodes,
        local_addr="127.0.0.1",
        join_timeout_seconds=60,
        last_call_timeout_seconds=0.5,
        ttl_seconds=30,  # the restart must not make peers look dead
    )


def test_group_reforms_after_etcd_restarts_with_its_data(
    etcd_factory: EtcdFactory, run_id: str
) -> None:
    server = etcd_factory()
    config = etcd_config(server, connect_timeout_seconds=5.0, request_timeout_seconds=2.0)
    handlers = [quick_handler(config, run_id, num_nodes=2) for _ in range(2)]
    try:
        first = form_round(handlers)
        assert sorted(first) == [(0, 2), (1, 2)]  # type: ignore[type-var]
        round_before = handlers[0].round

        server.restart()  # same ports, same data dir

        assert [h.num_nodes_waiting() for h in handlers] == [0, 0]
        second = form_round(handlers)
        assert sorted(second) == [(0, 2), (1, 2)]  # type: ignore[type-var]
        assert handlers[0].round == handlers[1].round > round_before
        assert all(h.view.resyncs >= 1 for h in handlers)  # the group watch came back
    finally:
        for handler in handlers:
            handler.shutdown()


def test_long_outage_raises_connection_error_naming_the_endpoint(
    etcd_factory: EtcdFactory, run_id: str
) -> None:
    server = etcd_factory()
    config = etcd_config(server, connect_timeout_seconds=1.0, request_timeout_seconds=1.0)
    handler = quick_handler(config, run_id, num_nodes=2)
    try:
        server.kill()
        started = time.monotonic()
        with pytest.raises(RendezvousConnectionError, match=server.endpoint) as raised:
            handler.next_rendezvous()
        assert time.monotonic() - started < 10.0  # a clear error, not a hang
        assert isinstance(raised.value, EtcdUnavailableError)
        assert "within 1 s" in str(raised.value)
        with pytest.raises(EtcdUnavailableError, match=server.endpoint):
            create_handler(config, run_id=run_id, min_nodes=1, max_nodes=1)
    finally:
        handler.shutdown()


def test_client_fails_over_to_a_live_endpoint(etcd_factory: EtcdFactory, run_id: str) -> None:
    server = etcd_factory()
    dead = f"127.0.0.1:{free_port()}"
    config = etcd_config(server, endpoints=(dead, server.endpoint), connect_timeout_seconds=5.0)
    for _ in range(3):  # whichever endpoint it starts on, every call succeeds
        client = connect(config)
        try:
            client.put(f"/test/{run_id}/k", b"v")
            stored = client.get(f"/test/{run_id}/k")
            assert stored is not None and stored.value == b"v"
        finally:
            client.close()
