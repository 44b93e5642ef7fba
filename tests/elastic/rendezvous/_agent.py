"""A minimal elastic agent for the multi-process tests (run as ``python -m``).

With ``--lease-only`` it only holds a ``NodeLease`` (node record ``{"state": "active"}``).
Otherwise its rendezvous handler is the node (its record, named ``--node-id``, under the
handler's lease): it joins rounds, prints ``{"event": "round", ...}`` after each and re-joins
when a node leaves (its lease went away, seen by a ``NodeWatch``) or a newcomer waits. SIGTERM is
a graceful exit: the lease is revoked before the process ends. Every stdout line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from elastic.rendezvous import EtcdConfig, NodeLease, NodeWatch, connect, create_handler


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--min-nodes", type=int, default=1)
    parser.add_argument("--max-nodes", type=int, default=1)
    parser.add_argument("--ttl-seconds", type=float, default=2.0)
    parser.add_argument("--lease-only", action="store_true")
    return parser.parse_args(argv)


def run_rounds(args: argparse.Namespace, client: Any, stop: threading.Event) -> None:
    handler = create_handler(
        client,
        run_id=args.run_id,
        min_nodes=args.min_nodes,
        max_nodes=args.max_nodes,
        local_addr="127.0.0.1",
        join_timeout_seconds=60,
        last_call_timeout_seconds=1.0,
        ttl_seconds=args.ttl_seconds,
        node_name=args.node_id,
    )
    watch = NodeWatch(client, run_id=args.run_id).start()
    emit(event="registered", node=args.node_id, pid=os.getpid())
    try:
        while not stop.is_set():
            info = handler.next_rendezvous()
            emit(
                event="round",
                node=args.node_id,
                round=handler.round,
                rank=info.rank,
                world_size=info.world_size,
            )
            wait_for_change(args, handler, watch, stop)
    finally:
        handler.leave()  # not shutdown(): that would close the run for the others
        emit(event="revoked", node=args.node_id)
        watch.close()


def wait_for_change(
    args: argparse.Namespace, handler: Any, watch: NodeWatch, stop: threading.Event
) -> None:
    """Until a node left or a newer round waits for this one (or SIGTERM)."""
    while not stop.is_set():
        event = watch.get(0.2)
        if event is not None and event.kind == "left":
            emit(event="node_left", node=args.node_id, other=event.node_id)
            return
        if handler.num_nodes_waiting() > 0:
            return


def hold_lease(args: argparse.Namespace, client: Any, stop: threading.Event) -> None:
    lease = NodeLease(client, run_id=args.run_id, ttl_seconds=args.ttl_seconds)
    lease.register(args.node_id, {"state": "active", "pid": os.getpid()})
    emit(event="registered", node=args.node_id, pid=os.getpid())
    try:
        while not stop.wait(0.1):
            pass
    finally:
        lease.revoke()
        emit(event="revoked", node=args.node_id)


def main(argv: list[str]) -> int:
    args = parse(argv)
    config = EtcdConfig(endpoints=(args.endpoint,), connect_timeout_seconds=10.0)
    client = connect(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.lease_only:
        hold_lease(args, client, stop)
    else:
        run_rounds(args, client, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
