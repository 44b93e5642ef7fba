"""Fixtures for the rendezvous tests: real etcd servers and a KV factory over both backends."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence

import pytest
from torch.distributed.elastic.rendezvous.api import RendezvousHandler

from elastic.rendezvous import EtcdConfig, InMemoryEtcd, KeyValueClient, connect
from tests.support.etcd import EtcdServer, etcd_factory, etcd_server

__all__ = ["etcd_factory", "etcd_server", "form_round", "kv_factory", "run_id"]

_run_ids = itertools.count()

KvFactory = Callable[[], KeyValueClient]


def etcd_config(server: EtcdServer, **overrides: object) -> EtcdConfig:
    """A config for ``server`` with short timeouts, so failures surface fast in tests."""
    values: dict[str, object] = {
        "endpoints": (server.endpoint,),
        "connect_timeout_seconds": 3.0,
        "request_timeout_seconds": 3.0,
    }
    values.update(overrides)
    return EtcdConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def run_id(request: pytest.FixtureRequest) -> str:
    """A run id unique within the session (tests share one etcd per module)."""
    return f"run{next(_run_ids)}-{request.node.name[:40]}".replace("[", "-").replace("]", "")


@pytest.fixture(params=["memory", "etcd"])
def kv_factory(request: pytest.FixtureRequest) -> Iterator[KvFactory]:
    """``kv_factory()`` opens a new client to one shared server: in-memory or a real etcd."""
    clients: list[KeyValueClient] = []
    if request.param == "memory":
        memory = InMemoryEtcd()

        def open_client() -> KeyValueClient:
            clients.append(memory.client())
            return clients[-1]
    else:
        server: EtcdServer = request.getfixturevalue("etcd_server")

        def open_client() -> KeyValueClient:
            clients.append(connect(etcd_config(server)))
            return clients[-1]

    try:
        yield open_client
    finally:
        for client in clients:
            client.close()


def form_round(
    handlers: Sequence[RendezvousHandler], *, timeout_seconds: float = 60.0
) -> list[tuple[int, int] | BaseException]:
    """``next_rendezvous()`` on every handler at once; ``(rank, world_size)`` or the error each."""
    results: list[tuple[int, int] | BaseException | None] = [None] * len(handlers)

    def join(index: int) -> None:
        try:
            info = handlers[index].next_rendezvous()
            results[index] = (info.rank, info.world_size)
        except BaseException as exc:  # handed to the test, which asserts on it
            results[index] = exc

    threads = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(len(handlers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_seconds)
    assert not any(t.is_alive() for t in threads), "rendezvous did not finish in time"
    return [r for r in results if r is not None]
