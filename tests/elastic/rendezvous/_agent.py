"""A minimal elastic agent for the multi-process tests (run as ``python -m``).

It registers a ``NodeLease``, watches the other nodes and, unless ``--lease-only``, joins
rendezvous rounds: after each round it prints ``{"event": "round", ...}`` and re-joins when a
node leaves (its lease went away) or a newcomer waits. SIGTERM is a graceful exit: the lease is
revoked before the process ends. Every line on stdout is one JSON object.
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


def run_rounds(
    args: argparse.Namespace, client: Any, watch: NodeWatch, stop: threading.Event
) -> None:
    handler = create_handler(
        client,
        run_id=args.run_id,
        min_nodes=args.min_nodes,
        max_nodes=args.max_nodes,
        local_addr="127.0.0.1",
        join_timeout_seconds=60,
        last_call_timeout_seconds=1.0,
        keep_alive_interval_seconds=1.0,
        keep_alive_max_attempt=3,
    )
    while not stop.is_set():
        info = handler.next_rendezvous()
        emit(
            event="round",
            node=args.node_id,
            round=handler.round,
            rank=info.rank,
            world_size=info.world_size,
        )
        while not stop.is_set():
            event = watch.get(0.2)
            if event is not None and event.kind == "left":
                emit(event="node_left", node=args.node_id, other=event.node_id)
                break
            if handler.num_nodes_waiting() > 0:
                break


def main(argv: list[str]) -> int:
    args = parse(argv)
    config = EtcdConfig(endpoints=(args.endpoint,), connect_timeout_seconds=10.0)
    client = connect(config)
    stop = threading.Event()
    lease = NodeLease(client, run_id=args.run_id, ttl_seconds=args.ttl_seconds)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    watch = NodeWatch(client, run_id=args.run_id).start()
    lease.register(args.node_id, {"pid": os.getpid()})
    emit(event="registered", node=args.node_id, pid=os.getpid())
    try:
        if args.lease_only:
            while not stop.wait(0.1):
                pass
        else:
            run_rounds(args, client, watch, stop)
    finally:
        lease.revoke()
        emit(event="revoked", node=args.node_id)
        watch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
