"""The etcd v3 adapter: the only module that imports ``etcd3`` (python3-etcd3) and ``grpc``.

``connect(config)`` returns an :class:`EtcdClient` implementing ``kv.KeyValueClient``:

- Failover: one gRPC channel per endpoint; a call that fails for connectivity moves to the
  next endpoint and retries with backoff until ``connect_timeout_seconds`` has passed, then
  raises ``EtcdUnavailableError`` naming every endpoint and the last cause.
- TLS: ``tls_ca`` (or an ``https://`` endpoint) gives a secure channel, ``tls_cert``/``tls_key``
  a client certificate. A failed handshake is ``EtcdTlsError`` at once (not retried).
- Auth: user/password through etcd's Authenticate; a token lost in an etcd restart is
  re-acquired transparently.
- Errors: every grpc/etcd3 error leaves this module wrapped in the ``errors`` hierarchy with
  ``raise ... from exc``.

Caveats of python3-etcd3 0.13 worked around here: its endpoints are marked "failed" for 300 s
after one error (we use ``time_retry=0`` and fail over ourselves), and its watch thread breaks on
stream errors without telling callbacks (we run our own watch stream on ``etcdrpc``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

# Read once when grpc loads. Its core logs e.g. a failed TLS handshake at INFO on stderr, ahead
# of our own error (elasticctl's one line, the daemon's JSON); GRPC_VERBOSITY set by the user wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import etcd3
import etcd3.exceptions
import grpc
from etcd3 import etcdrpc
from etcd3.client import Endpoint as Etcd3Endpoint
from etcd3.client import MultiEndpointEtcd3Client

from elastic import jsonlog
from elastic.rendezvous.config import EtcdConfig, parse_endpoint
from elastic.rendezvous.errors import (
    EtcdAuthError,
    EtcdConnectionError,
    EtcdLeaseNotFoundError,
    EtcdRendezvousError,
    EtcdRequestError,
    EtcdTlsError,
    EtcdUnavailableError,
)
from elastic.rendezvous.kv import (
    DeleteRange,
    ErrorCallback,
    EventsCallback,
    KeyValue,
    KeyValueClient,
    Op,
    Put,
    TxnResult,
    WatchEvent,
    WatchHandle,
    prefix_end,
)

T = TypeVar("T")
log = jsonlog.get("elastic.rendezvous.etcd")

# Reconnect quickly after an etcd restart instead of gRPC's default backoff of up to 120 s.
# Keepalive pings find a dead server on a silent network; etcd refuses pings under 5 s apart.
_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
_RETRY_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
}
_TLS_MARKERS = ("handshake", "ssl_error", "certificate", "tsi_")
_AUTH_MARKERS = ("authentication failed", "user name is empty", "permission denied")
_MAX_BACKOFF_SECONDS = 0.5


def _rpc_error(exc: BaseException) -> grpc.RpcError | None:
    """The grpc error behind an etcd3 exception (etcd3 raises its own inside ``except``)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.RpcError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: BaseException) -> tuple[grpc.StatusCode | None, str]:
    rpc = _rpc_error(exc)
    if rpc is not None and hasattr(rpc, "code"):
        return rpc.code(), f"{rpc.code().name}: {rpc.details()}"
    return None, f"{type(exc).__name__}: {exc}"


def _classify(exc: BaseException, endpoint: str) -> EtcdRendezvousError:
    """Map a vendor error to our hierarchy; ``temporary`` ones are retried by the caller."""
    code, detail = _describe(exc)
    message = f"etcd at {endpoint}: {detail}"
    if any(marker in detail.lower() for marker in _TLS_MARKERS):
        return EtcdTlsError(
            f"TLS handshake with etcd at {endpoint} failed (does the server require a client "
            f"certificate, see tls_cert/tls_key, and does tls_ca trust the server?): {detail}",
            endpoint=endpoint,
        )
    if "failed to connect" in detail and "socket closed" in detail.lower():
        message += " (a TLS-only server dialled without TLS closes the socket like this)"
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in detail:
        return EtcdLeaseNotFoundError(message)
    if code == grpc.StatusCode.UNAUTHENTICATED and "invalid auth token" in detail:
        return _TokenExpired(message, endpoint=endpoint)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or any(
        marker in detail for marker in _AUTH_MARKERS
    ):
        return EtcdAuthError(f"authentication with {message}", endpoint=endpoint)
    if code in _RETRY_CODES or isinstance(
        exc, etcd3.exceptions.ConnectionFailedError | etcd3.exceptions.ConnectionTimeoutError
    ):
        return EtcdUnavailableError(message, endpoint=endpoint)
    return EtcdRequestError(message)


class _TokenExpired(EtcdConnectionError):
    """The auth token died with an etcd restart: re-authenticate and retry (internal)."""

    temporary = True


def _read_file(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as fh:
        return fh.read()


class EtcdClient(KeyValueClient):
    """``KeyValueClient`` over python3-etcd3 with failover, TLS, auth and error wrapping."""

    def __init__(self, config: EtcdConfig, *, sleep: Callable[[float], None] = time.sleep) -> None:
        if not config.endpoints:
            raise ValueError("endpoints=(): EtcdClient needs at least one endpoint")
        self._config = config
        self._sleep = sleep
        self._endpoints = [parse_endpoint(e) for e in config.endpoints]
        self._clients: dict[int, MultiEndpointEtcd3Client] = {}
        self._current = 0
        self._lock = threading.Lock()
        self._watches: set[_WatchStream] = set()
        self._closed = False

    @property
    def endpoint(self) -> str:
        return ",".join(e.netloc for e in self._endpoints)

    @property
    def config(self) -> EtcdConfig:
        return self._config

    # -- connection management ---------------------------------------------------------------

    def _credentials(self, index: int) -> grpc.ChannelCredentials | None:
        endpoint = self._endpoints[index]
        config = self._config
        secure = endpoint.scheme == "https" or (endpoint.scheme is None and config.uses_tls)
        if not secure:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read_file(config.tls_ca),
            private_key=_read_file(config.tls_key),
            certificate_chain=_read_file(config.tls_cert),
        )

    def _client(self) -> tuple[int, MultiEndpointEtcd3Client]:
        with self._lock:
            if self._closed:
                raise EtcdConnectionError("etcd client is closed", endpoint=self.endpoint)
            index = self._current
            client = self._clients.get(index)
        return index, client if client is not None else self._open(index)

    def _open(self, index: int) -> MultiEndpointEtcd3Client:
        endpoint = self._endpoints[index]
        creds = self._credentials(index)
        ep = Etcd3Endpoint(
            endpoint.host,
            endpoint.port,
            secure=creds is not None,
            creds=creds,
            time_retry=0,  # never let etcd3 mark an endpoint dead; we fail over ourselves
            opts=_GRPC_OPTIONS,  # type: ignore[arg-type]  # grpc wants pairs, not a dict
        )
        try:
            # With user/password this authenticates at once, so it can fail like any call.
            client = MultiEndpointEtcd3Client(
                endpoints=[ep],
                timeout=self._config.request_timeout_seconds,
                user=self._config.user,
                password=self._config.password,
            )
        except BaseException:
            ep.close()
            raise
        if creds is None:
            # gRPC refuses call credentials on a plaintext channel; the token also travels
            # as request metadata, which is all etcd reads.
            client.call_credentials = None
        with self._lock:
            self._clients[index] = client
        return client

    def _on_failure(self, index: int, error: EtcdRendezvousError) -> None:
        """Move to the next endpoint; rebuild a channel only when its credentials are stale."""
        with self._lock:
            unreachable = isinstance(error, EtcdUnavailableError)
            if unreachable and len(self._endpoints) > 1 and self._current == index:
                self._current = (index + 1) % len(self._endpoints)
            # Other failures keep the channel: gRPC reconnects it (within 1 s, see options)
            # and closing it would also cancel other threads' calls and watches.
            stale = isinstance(error, _TokenExpired | EtcdTlsError)
            client = self._clients.pop(index, None) if stale else None
        if client is not None:
            client.close()

    def _call(self, what: str, fn: Callable[[MultiEndpointEtcd3Client], T]) -> T:
        """Run ``fn`` on the current endpoint; fail over and retry until the connect timeout."""
        deadline = time.monotonic() + self._config.connect_timeout_seconds
        backoff = 0.02
        while True:
            index = self._current
            try:
                index, client = self._client()
                return fn(client)
            except (grpc.RpcError, etcd3.exceptions.Etcd3Exception) as exc:
                error = _classify(exc, self._endpoints[index].netloc)
                self._on_failure(index, error)
                if not isinstance(error, EtcdUnavailableError | _TokenExpired):
                    raise error from exc
                if time.monotonic() + backoff > deadline:
                    raise EtcdUnavailableError(
                        f"etcd {what} failed: no answer from {self.endpoint} within "
                        f"{self._config.connect_timeout_seconds:g} s; last error from {error}",
                        endpoint=self.endpoint,
                    ) from exc
                self._sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)

    # -- KeyValueClient ----------------------------------------------------------------------

    def _unary(self, what: str, stub: str, method: str, request: Any) -> Any:
        """One unary etcd RPC with the client's deadline, credentials and auth token."""

        def call(client: MultiEndpointEtcd3Client) -> Any:
            rpc = getattr(getattr(client, stub), method)
            return rpc(
                request,
                client.timeout,
                credentials=client.call_credentials,
                metadata=client.metadata,
            )

        return self._call(what, call)

    def get(self, key: str) -> KeyValue | None:
        request = etcdrpc.RangeRequest(key=key.encode())
        response = self._unary("get", "kvstub", "Range", request)
        return _to_kv(response.kvs[0]) if response.kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        request = etcdrpc.RangeRequest(
            key=prefix.encode(),
            range_end=prefix_end(prefix).encode(),
            sort_order=etcdrpc.RangeRequest.ASCEND,
            sort_target=etcdrpc.RangeRequest.KEY,
        )
        response = self._unary("get_prefix", "kvstub", "Range", request)
        return [_to_kv(kv) for kv in response.kvs], int(response.header.revision)

    def put(self, key: str, value: bytes, *, lease_id: int | None = None) -> int:
        request = etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease_id or 0)
        return int(self._unary("put", "kvstub", "Put", request).header.revision)

    def commit(self, key: str, *, expected_mod_revision: int, ops: Sequence[Op]) -> TxnResult:
        compare = etcdrpc.Compare(
            key=key.encode(),
            result=etcdrpc.Compare.EQUAL,
            target=etcdrpc.Compare.MOD,
            mod_revision=expected_mod_revision,
        )
        read = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key.encode()))
        request = etcdrpc.TxnRequest(
            compare=[compare],
            success=[_to_request_op(op) for op in ops] + [read],
            failure=[read],
        )
        response = self._unary("txn", "kvstub", "Txn", request)
        # The last response is always our read of ``key``.
        kvs = response.responses[-1].response_range.kvs
        return TxnResult(
            succeeded=bool(response.succeeded),
            current=_to_kv(kvs[0]) if kvs else None,
            revision=int(response.header.revision),
        )

    def delete(self, key: str) -> bool:
        request = etcdrpc.DeleteRangeRequest(key=key.encode())
        return int(self._unary("delete", "kvstub", "DeleteRange", request).deleted) > 0

    def delete_range(self, start: str, end: str) -> int:
        request = etcdrpc.DeleteRangeRequest(key=start.encode(), range_end=end.encode())
        return int(self._unary("delete_range", "kvstub", "DeleteRange", request).deleted)

    def grant_lease(self, ttl_seconds: int) -> int:
        request = etcdrpc.LeaseGrantRequest(TTL=int(ttl_seconds))
        response = self._unary("lease_grant", "leasestub", "LeaseGrant", request)
        if response.error:
            raise EtcdRequestError(f"etcd at {self.endpoint}: lease grant: {response.error}")
        return int(response.ID)

    def refresh_lease(self, lease_id: int) -> int:
        responses = self._call("lease_keepalive", lambda c: list(c.refresh_lease(lease_id)))
        return int(responses[0].TTL) if responses else 0

    def revoke_lease(self, lease_id: int) -> None:
        request = etcdrpc.LeaseRevokeRequest(ID=lease_id)
        with contextlib.suppress(EtcdLeaseNotFoundError):  # already gone is what we wanted
            self._unary("lease_revoke", "leasestub", "LeaseRevoke", request)

    def watch_prefix(
        self,
        prefix: str,
        *,
        start_revision: int,
        on_events: EventsCallback,
        on_error: ErrorCallback,
    ) -> WatchHandle:
        # Through _call so that opening (and authenticating) the channel fails over like any
        # call; the stream itself is confirmed in wait_created below.
        index, client = self._call("watch", lambda _: self._client())
        stream = _WatchStream(
            client,
            netloc=self._endpoints[index].netloc,
            prefix=prefix,
            start_revision=start_revision,
            on_events=on_events,
            on_error=on_error,
            forget=self._forget_watch,
        )
        with self._lock:
            self._watches.add(stream)
        stream.start()
        try:
            stream.wait_created(self._config.request_timeout_seconds)
        except BaseException:
            stream.cancel()
            raise
        return stream

    def _forget_watch(self, stream: _WatchStream) -> None:
        with self._lock:
            self._watches.discard(stream)

    def status(self) -> str:
        """The server version (a cheap round trip that proves connectivity, TLS and auth)."""
        response = self._unary("status", "maintenancestub", "Status", etcdrpc.StatusRequest())
        return str(response.version)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients = list(self._clients.values())
            self._clients.clear()
            watches = list(self._watches)
        for watch in watches:
            watch.cancel()
        for client in clients:
            client.close()


def _to_kv(kv: Any) -> KeyValue:
    """mvccpb.KeyValue -> KeyValue."""
    return KeyValue(
        key=kv.key.decode(),
        value=bytes(kv.value),
        mod_revision=int(kv.mod_revision),
        create_revision=int(kv.create_revision),
        lease_id=int(kv.lease),
    )


def _to_request_op(op: Op) -> Any:
    if isinstance(op, Put):
        put = etcdrpc.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease_id or 0)
        return etcdrpc.RequestOp(request_put=put)
    if isinstance(op, DeleteRange):
        end = op.end.encode() if op.end is not None else b""
        delete = etcdrpc.DeleteRangeRequest(key=op.start.encode(), range_end=end)
        return etcdrpc.RequestOp(request_delete_range=delete)
    raise TypeError(f"unknown transaction op {op!r}")


class _WatchStream(WatchHandle):
    """One gRPC Watch stream on ``etcdrpc`` with its own reader thread."""

    def __init__(
        self,
        client: MultiEndpointEtcd3Client,
        *,
        netloc: str,
        prefix: str,
        start_revision: int,
        on_events: EventsCallback,
        on_error: ErrorCallback,
        forget: Callable[[_WatchStream], None],
    ) -> None:
        self._client = client
        self._netloc = netloc
        self._on_events = on_events
        self._on_error = on_error
        self._forget = forget
        self._requests: queue.Queue[Any] = queue.Queue()
        create = etcdrpc.WatchCreateRequest(
            key=prefix.encode(),
            range_end=prefix_end(prefix).encode(),
            start_revision=start_revision,
        )
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        self._cancelled = threading.Event()
        self._created = threading.Event()
        self._start_error: Exception | None = None
        self._call: Any = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch{prefix}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_created(self, timeout_seconds: float) -> None:
        """Block until etcd confirmed the watch, so no write after this call is missed."""
        if not self._created.wait(timeout_seconds):
            raise EtcdUnavailableError(
                f"etcd at {self._netloc} did not confirm a watch within {timeout_seconds:g} s",
                endpoint=self._netloc,
            )
        if self._start_error is not None:
            raise self._start_error

    def _request_iter(self) -> Iterator[Any]:
        while True:
            request = self._requests.get()
            if request is None:
                return
            yield request

    def _run(self) -> None:
        error: Exception | None = None
        try:
            stub = etcdrpc.WatchStub(self._client.channel)
            call = stub.Watch(
                self._request_iter(),
                credentials=self._client.call_credentials,
                metadata=self._client.metadata,
            )
            with self._lock:
                self._call = call
                if self._cancelled.is_set():
                    call.cancel()
            for response in call:
                error = self._handle(response)
                if error is not None:
                    break
            else:
                error = EtcdUnavailableError(
                    f"etcd at {self._netloc} ended the watch stream", endpoint=self._netloc
                )
        except (grpc.RpcError, ValueError) as exc:
            error = _classify(exc, self._netloc)
            error.__cause__ = exc
        finally:
            self._requests.put(None)
            self._forget(self)
        if not self._created.is_set():  # failed before etcd confirmed: the creator raises it
            self._start_error = error
            self._created.set()
            return
        if error is not None and not self._cancelled.is_set():
            self._on_error(error)

    def _handle(self, response: Any) -> Exception | None:
        if response.created:
            self._created.set()
        if response.compact_revision:
            return EtcdRequestError(
                f"etcd at {self._netloc}: watch revision compacted "
                f"(oldest kept {response.compact_revision})"
            )
        if response.canceled:
            return EtcdRequestError(
                f"etcd at {self._netloc} cancelled the watch: {response.cancel_reason}"
            )
        if response.events and not self._cancelled.is_set():
            self._on_events([_to_event(e) for e in response.events])
        return None

    def cancel(self) -> None:
        self._cancelled.set()
        self._requests.put(None)
        with self._lock:
            if self._call is not None:
                self._call.cancel()


def _to_event(event: Any) -> WatchEvent:
    # mvccpb.Event.EventType: PUT=0, DELETE=1
    return WatchEvent(
        kind="delete" if event.type == 1 else "put",
        key=event.kv.key.decode(),
        value=bytes(event.kv.value),
        mod_revision=int(event.kv.mod_revision),
    )


def connect(config: EtcdConfig, *, probe: bool = True) -> EtcdClient:
    """An ``EtcdClient`` for ``config``; with ``probe`` one round trip proves it works now.

    Raises ``EtcdTlsError`` / ``EtcdAuthError`` for refused credentials and
    ``EtcdUnavailableError`` when no endpoint answers within ``connect_timeout_seconds``.
    """
    client = EtcdClient(config)
    if probe:
        try:
            client.status()
        except BaseException:
            client.close()
            raise
    return client
