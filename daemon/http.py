"""The node's HTTP endpoint: ``/healthz`` (process alive), ``/readyz`` (in a running round),
``/metrics`` (Prometheus text format). A thread in the daemon; it keeps answering in every state,
``failed`` included, so operators and probes can see why a run stopped.

Limits, so that a scanner or a crowd of idle clients cannot starve the daemon or its probes:

- One thread per connection, at most ``max_connections`` (default 32) at once. A connection
  beyond the cap is closed as soon as it is accepted, in the accept thread, without a thread
  of its own: the client sees the connection end at once and retries.
- A request must arrive whole within ``read_timeout_seconds`` (default 10) of the connection's
  accept, however the client trickles it; writing the answer has the same bound. A connection
  therefore holds its slot for at most about twice that, and once the connections holding the
  slots end or time out, a new request is answered.
- HTTP/1.0: one request per connection, no idle keep-alive connections.
- A client that goes away (reset, broken pipe, timeout) costs one debug line, no traceback; any
  other error in a handler is one error line (JSON, with the traceback in its ``exception``).
"""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from elastic import jsonlog

READ_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 32
# Listen backlog: a burst of connects is accepted (and, past the cap, closed) at once instead
# of waiting for SYN retries behind a full queue.
LISTEN_BACKLOG = 128


class StatusServer:
    """Serve health, readiness and metrics until ``close()``."""

    def __init__(
        self,
        *,
        bind: str,
        port: int,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]],
        ready: Callable[[], bool],
        read_timeout_seconds: float = READ_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        log: Any = None,
    ) -> None:
        if read_timeout_seconds <= 0 or max_connections < 1:
            raise ValueError(f"{read_timeout_seconds=} must be > 0, {max_connections=} >= 1")
        handler = _handler_class(registry, status, ready, timeout_seconds=read_timeout_seconds)
        self._server = _Server(
            (bind, port),
            handler,
            max_connections=max_connections,
            log=log if log is not None else jsonlog.get("daemon.http"),
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def active_connections(self) -> int:
        """Connections being served now (each on its own thread)."""
        return self._server.active_connections

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def probe_bind(bind: str, port: int) -> None:
    """Bind a socket as the status server will, and close it: ``OSError`` (``socket.gaierror``
    for a name that does not resolve) when the server could not start on ``bind:port``."""
    with socket.socket(_Server.address_family, socket.SOCK_STREAM) as sock:
        if _Server.allow_reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer with a cap on its connection threads and quiet client drops."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_connections: int,
        log: Any,
    ) -> None:
        self._max_connections = max_connections
        self._active = 0
        self._lock = threading.Lock()
        self.log = log
        super().__init__(address, handler)

    @property
    def active_connections(self) -> int:
        with self._lock:
            return self._active

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            refused = self._active >= self._max_connections
            self._active += 0 if refused else 1
        if refused:
            self.log.debug("http_connection_refused", client=_client(client_address))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's default prints a traceback to stderr for every dropped client.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            self.log.debug(
                "http_client_dropped", client=_client(client_address), error=type(error).__name__
            )
        else:
            self.log.error("http_handler_failed", client=_client(client_address), exc_info=True)


class _DeadlineReader(io.RawIOBase):
    """A connection's incoming bytes, all due by one deadline: a client that sends a byte now
    and then cannot hold its slot past the read timeout (a socket timeout alone bounds only
    the wait for each next byte)."""

    def __init__(self, connection: socket.socket, *, deadline: float) -> None:
        super().__init__()
        self._connection = connection
        self._deadline = deadline  # time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining_seconds = self._deadline - time.monotonic()
        if remaining_seconds <= 0:
            raise TimeoutError("request not received within the read timeout")
        self._connection.settimeout(remaining_seconds)
        return self._connection.recv_into(buffer)


def _handler_class(
    registry: CollectorRegistry,
    status: Callable[[], dict[str, Any]],
    ready: Callable[[], bool],
    *,
    timeout_seconds: float,
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_seconds  # StreamRequestHandler sets it on the socket in setup()

        def setup(self) -> None:
            super().setup()
            self.rfile.close()
            deadline = time.monotonic() + timeout_seconds
            self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline=deadline))

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, json.dumps(status()).encode(), "application/json")
            elif path == "/readyz":
                code = 200 if ready() else 503
                self._send(code, json.dumps(status()).encode(), "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            # The read deadline shortened the socket's timeout; the answer gets its own (a
            # sendall's timeout bounds the whole write).
            self.connection.settimeout(timeout_seconds)
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes every second would flood the JSON log

        def log_error(self, format: str, *args: Any) -> None:
            # Timeouts and malformed requests (http.server answers those itself).
            server: Any = self.server
            server.log.debug(
                "http_client_error", client=_client(self.client_address), detail=format % args
            )

    return Handler


def _client(address: Any) -> str:
    """``host:port`` of a client address tuple (for log lines)."""
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return str(address)
