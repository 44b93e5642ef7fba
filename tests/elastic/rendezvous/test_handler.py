"""EtcdRendezvousHandler on the in-memory KV: torch's algorithm plus per-round bootstrap info."""

from __future__ import annotations

import threading
import time

from torch.distributed.elastic.rendezvous.api import RendezvousInfo

from elastic.rendezvous import InMemoryEtcd, create_handler
from elastic.rendezvous.handler import EtcdRendezvousHandler

WAIT_SECONDS = 60.0


def handler(memory: InMemoryEtcd, run_id: str) -> EtcdRendezvousHandler:
    return create_handler(
        memory.client(),
        run_id=run_id,
        min_nodes=2,
        max_nodes=3,
        local_addr="127.0.0.1",
        last_call_timeout_seconds=0.5,
        keep_alive_interval_seconds=1.0,
    )


def test_a_late_joiner_gets_a_round_with_the_current_master_address(run_id: str) -> None:
    memory = InMemoryEtcd()
    handlers = [handler(memory, run_id) for _ in range(3)]
    infos: dict[int, list[RendezvousInfo]] = {0: [], 1: [], 2: []}
    errors: list[BaseException] = []

    def founder(index: int) -> None:
        try:
            infos[index].append(handlers[index].next_rendezvous())
            deadline = time.monotonic() + WAIT_SECONDS
            while handlers[index].num_nodes_waiting() == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            infos[index].append(handlers[index].next_rendezvous())
        except BaseException as exc:
            errors.append(exc)

    def latecomer() -> None:
        try:
            infos[2].append(handlers[2].next_rendezvous())
        except BaseException as exc:
            errors.append(exc)

    founders = [threading.Thread(target=founder, args=(i,), daemon=True) for i in (0, 1)]
    for thread in founders:
        thread.start()
    deadline = time.monotonic() + WAIT_SECONDS
    while not (infos[0] and infos[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    late = threading.Thread(target=latecomer, daemon=True)
    late.start()
    for thread in [*founders, late]:
        thread.join(timeout=WAIT_SECONDS)
    try:
        assert errors == [] and not any(t.is_alive() for t in [*founders, late])
        assert [len(infos[i]) for i in (0, 1, 2)] == [2, 2, 1]
        final = [infos[0][1], infos[1][1], infos[2][0]]
        assert sorted(i.rank for i in final) == [0, 1, 2]
        assert {i.world_size for i in final} == {3}
        # Everyone bootstraps from the TCPStore rank 0 serves, the newcomer included.
        addresses = {
            (i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port)
            for i in final
            if i.bootstrap_store_info is not None
        }
        assert len(addresses) == 1
        assert len({h.round for h in handlers}) == 1
    finally:
        for h in handlers:
            h.shutdown()
