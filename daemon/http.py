"""The node's HTTP endpoint: ``/healthz`` (process alive), ``/readyz`` (in a running round),
``/metrics`` (Prometheus text format). A thread in the daemon; it keeps answering in every state,
``failed`` included, so operators and probes can see why a run stopped.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


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
    ) -> None:
        handler = _handler_class(registry, status, ready)
        self._server = ThreadingHTTPServer((bind, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler_class(
    registry: CollectorRegistry,
    status: Callable[[], dict[str, Any]],
    ready: Callable[[], bool],
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
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
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes every second would flood the JSON log

    return Handler
