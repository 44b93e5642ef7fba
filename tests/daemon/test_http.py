"""The node's HTTP endpoint under hostile clients: a cap on connection threads, a read deadline,
and dropped clients that cost a debug line instead of a traceback (daemon/http.py)."""

from __future__ import annotations

import http.client
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.http import StatusServer
from tests.support.procs import wait_for

CAP = 32
IDLE_CLIENTS = 200


class RecordingLog:
    """Stands in for the structlog logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def _add(self, level: str, event: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self.lines.append((level, event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self._add("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, fields)

    def events(self, level: str) -> list[str]:
        with self._lock:
            return [event for lvl, event, _ in self.lines if lvl == level]


@contextmanager
def serving(
    registry: CollectorRegistry | None = None, *, read_timeout_seconds: float = 10.0
) -> Iterator[tuple[StatusServer, RecordingLog]]:
    log = RecordingLog()
    if registry is None:
        registry = CollectorRegistry()
        Counter("elasticd_test_total", "a metric", registry=registry).inc()
    server = StatusServer(
        bind="127.0.0.1",
        port=0,
        registry=registry,
        status=lambda: {"state": "running"},
        ready=lambda: False,
        read_timeout_seconds=read_timeout_seconds,
        max_connections=CAP,
        log=log,
    )
    server.start()
    try:
        yield server, log
    finally:
        server.close()


def get(port: int, path: str, *, timeout_seconds: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_seconds)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed this idle connection (EOF or reset), without blocking."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def reset(sock: socket.socket) -> None:
    """Close with an RST, as a killed client or a dropped connection does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_health_ready_metrics_and_unknown_paths_answer() -> None:
    with serving() as (server, _):
        assert get(server.port, "/healthz") == (200, b'{"state": "running"}')
        assert get(server.port, "/readyz")[0] == 503
        status, body = get(server.port, "/metrics")
        assert status == 200 and b"elasticd_test_total 1.0" in body
        assert get(server.port, "/nope")[0] == 404


def test_idle_connections_past_the_cap_get_no_thread_and_metrics_answer_after_the_timeout() -> None:
    read_timeout_seconds = 3.0
    with serving(read_timeout_seconds=read_timeout_seconds) as (server, log):
        threads_before = threading.active_count()
        opened = time.monotonic()
        idle = [
            socket.create_connection(("127.0.0.1", server.port), timeout=5)
            for _ in range(IDLE_CLIENTS)
        ]
        try:
            # Past the cap, connections are closed at once, in the accept thread.
            wait_for(
                lambda: sum(map(closed_by_server, idle)) >= IDLE_CLIENTS - CAP,
                timeout_seconds=read_timeout_seconds / 2,
                what=f"{IDLE_CLIENTS - CAP} connections past the cap closed",
            )
            assert server.active_connections == CAP
            assert threading.active_count() <= threads_before + CAP + 1
            # While the cap is held a new request is turned away at once, not queued.
            if time.monotonic() - opened < read_timeout_seconds - 1:
                with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
                    get(server.port, "/metrics", timeout_seconds=1.0)
            # The held ones time out; then a scrape is answered.
            wait_for(
                lambda: all(map(closed_by_server, idle)),
                timeout_seconds=read_timeout_seconds + 5,
                what="the idle connections to time out",
            )
            wait_for(
                lambda: server.active_connections == 0,
                timeout_seconds=5,
                what="every connection thread to end",
            )
            status, body = get(server.port, "/metrics")
            assert status == 200 and b"elasticd_test_total" in body
            wait_for(
                lambda: threading.active_count() <= threads_before,
                timeout_seconds=5,
                what="the connection threads to exit",
            )
        finally:
            for sock in idle:
                sock.close()
    assert log.events("error") == []
    assert len(log.events("debug")) >= IDLE_CLIENTS - CAP  # refusals, timeouts: debug only


def test_a_request_trickled_byte_by_byte_is_cut_at_the_read_timeout() -> None:
    read_timeout_seconds = 1.0
    with serving(read_timeout_seconds=read_timeout_seconds) as (server, _):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        started = time.monotonic()
        try:
            cut = False
            # Each byte comes well within the timeout; the request as a whole never does.
            for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 1000:
                try:
                    sock.sendall(bytes([byte]))
                except ConnectionError:
                    cut = True
                    break
                if closed_by_server(sock):
                    cut = True
                    break
                time.sleep(read_timeout_seconds / 10)
            elapsed_seconds = time.monotonic() - started
        finally:
            sock.close()
    assert cut and elapsed_seconds < read_timeout_seconds + 2


class _BlockingCollector(Collector):
    """A large /metrics answer that is produced only once the test lets it."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.release.wait(timeout=10)
        # Larger than any socket buffer: the write cannot complete into the kernel.
        yield GaugeMetricFamily("elasticd_test_big", "x" * 8_000_000, value=1.0)


@pytest.mark.parametrize("when", ["before_the_answer", "mid_request"])
def test_a_client_that_drops_leaves_one_debug_line_and_no_traceback(
    when: str, capfd: pytest.CaptureFixture[str]
) -> None:
    release = threading.Event()
    registry = CollectorRegistry()
    registry.register(_BlockingCollector(release))
    with serving(registry) as (server, log):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        if when == "before_the_answer":
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            wait_for(lambda: server.active_connections == 1, timeout_seconds=5, what="handler")
        else:
            sock.sendall(b"GET /metr")
        reset(sock)
        release.set()
        wait_for(
            lambda: server.active_connections == 0,
            timeout_seconds=15,
            what="the handler to give up on the dropped client",
        )
        status, _ = get(server.port, "/healthz")
        assert status == 200  # the server goes on
    assert "Traceback" not in capfd.readouterr().err
    assert log.events("error") == []
    assert log.events("debug") == ["http_client_dropped"]
