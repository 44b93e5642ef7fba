"""Round re-formation latency: ``complete_when``, ``poll_seconds`` and ``leave()`` of the handler.

Each test gives torch's own waits (last call, keep-alive expiry) far more time than the test
allows, so a round that forms only because those waits ran out fails the time bound.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable

import pytest
from torch.distributed.elastic.rendezvous.api import RendezvousInfo

from elastic.rendezvous import create_handler
from elastic.rendezvous.handler import EtcdRendezvousHandler
from tests.elastic.rendezvous.conftest import KvFactory

LAST_CALL_SECONDS = 30.0
KEEP_ALIVE_SECONDS = 5.0  # a silent node is dropped after 3 x this = 15 s
FAST_SECONDS = 8.0  # far below both


def make(
    kv_factory: KvFactory,
    run_id: str,
    *,
    expected: Callable[[], set[str]] | None,
    last_call_seconds: float = LAST_CALL_SECONDS,
) -> EtcdRendezvousHandler:
    complete_when = None
    if expected is not None:

        def complete_when(participants: frozenset[str]) -> bool:
            return expected() <= participants

    return create_handler(
        kv_factory(),
        run_id=run_id,
        min_nodes=1,
        max_nodes=3,
        local_addr="127.0.0.1",
        last_call_timeout_seconds=last_call_seconds,
        keep_alive_interval_seconds=KEEP_ALIVE_SECONDS,
        heartbeat_timeout_seconds=KEEP_ALIVE_SECONDS,
        poll_seconds=0.05,
        complete_when=complete_when,
    )


def join_all(handlers: list[EtcdRendezvousHandler]) -> tuple[list[RendezvousInfo], float]:
    """Every handler's next round (concurrently) and the seconds until the last one had it."""
    infos: dict[int, RendezvousInfo] = {}
    errors: list[BaseException] = []

    def join(index: int) -> None:
        try:
            infos[index] = handlers[index].next_rendezvous()
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(len(handlers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=LAST_CALL_SECONDS + 30)
    assert errors == [] and len(infos) == len(handlers)
    return [infos[i] for i in range(len(handlers))], time.monotonic() - started


def test_a_round_completes_once_every_expected_node_joined_not_at_the_last_call(
    kv_factory: KvFactory, run_id: str
) -> None:
    names: set[str] = set()
    handlers = [make(kv_factory, run_id, expected=lambda: names) for _ in range(2)]
    names.update(h.node_name for h in handlers)
    try:
        infos, seconds = join_all(handlers)
        assert seconds < FAST_SECONDS
        assert sorted(i.rank for i in infos) == [0, 1]
        assert {i.world_size for i in infos} == {2}
    finally:
        for h in handlers:
            h.shutdown()


def test_without_complete_when_the_round_still_waits_for_the_last_call(
    kv_factory: KvFactory, run_id: str
) -> None:
    handlers = [make(kv_factory, run_id, expected=None, last_call_seconds=1.5) for _ in range(2)]
    try:
        infos, seconds = join_all(handlers)
        assert seconds >= 1.5  # torch's algorithm: below max_nodes, only the last call ends it
        assert {i.world_size for i in infos} == {2}
    finally:
        for h in handlers:
            h.shutdown()


def test_a_node_that_leaves_does_not_hold_up_the_next_round_of_the_others(
    kv_factory: KvFactory, run_id: str
) -> None:
    names: set[str] = set()
    handlers = [make(kv_factory, run_id, expected=lambda: names) for _ in range(3)]
    names.update(h.node_name for h in handlers)
    try:
        first, _ = join_all(handlers)  # three of max three: complete at once
        assert {i.world_size for i in first} == {3}
        leaving = handlers.pop()
        names.discard(leaving.node_name)
        leaving.leave()
        second, seconds = join_all(handlers)
        assert seconds < FAST_SECONDS  # not after the leaver's keep-alives expired (15 s)
        assert {i.world_size for i in second} == {2}
        assert sorted(i.rank for i in second) == [0, 1]
        assert handlers[0].round == handlers[1].round == leaving.round + 1
    finally:
        for h in handlers:
            h.shutdown()


def test_rendezvous_events_keep_torch_names_without_walking_the_stack(
    kv_factory: KvFactory, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch names each event after the recording method via inspect.stack(), which dominated
    # the CPU of large rounds; ours must give the same names without it.
    from elastic.rendezvous import handler as handler_module

    names: list[str] = []
    monkeypatch.setattr(
        handler_module, "construct_and_record_rdzv_event", lambda **kw: names.append(kw["name"])
    )

    def no_stack_walks(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect.stack() called")

    monkeypatch.setattr(inspect, "stack", no_stack_walks)
    plain = create_handler(  # torch's waits: the plain executor
        kv_factory(), run_id=f"{run_id}-plain", min_nodes=1, max_nodes=1, local_addr="127.0.0.1"
    )
    tuned = make(kv_factory, f"{run_id}-tuned", expected=lambda: set())
    for handler in (plain, tuned):
        try:
            assert handler.next_rendezvous().world_size == 1
        finally:
            handler.shutdown()
    assert "EtcdRendezvousHandler.next_rendezvous" in names
    assert "_Executor.run" in names and "_JoinExecutor.run" in names
