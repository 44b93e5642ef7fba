"""A real Prometheus server on loopback for tests: config, start, readiness, queries, stop.

``PrometheusServer(targets, scrape_interval_seconds=1, rule_files=[...])`` writes a config that
scrapes ``targets`` (``host:port``, job ``elasticd``) and loads ``rule_files``, starts the Debian
``prometheus`` binary on a free ``127.0.0.1`` port with a temporary TSDB, and waits (bounded) for
``/-/ready``. Use it as a context manager, or call ``start()``/``stop()`` yourself::

    with PrometheusServer(["127.0.0.1:9400"], rule_files=[RULES]) as prom:
        prom.wait_for('up{job="elasticd"} == 1', timeout_seconds=20)
        series = prom.query("elasticd_train_step")

Queries go through the HTTP API with urllib; a PromQL error raises :class:`PrometheusQueryError`
with Prometheus' message. The server's log is kept in its work directory for failure messages.

:class:`ExpressionWatch` polls one expression in a thread (every 0.2 s by default) and keeps each
answer with Prometheus' evaluation time, so a test can ask afterwards when a series first
appeared (``watch.first_seen(kind="nan", after_unix_seconds=t)``) without having to be polling
at the moment the event happened.

Also here, for tests that need something to scrape without a daemon: :func:`catalog_registry`
(every metric of ``daemon/metrics.yaml`` in a fresh prometheus_client registry, closed label values
created at 0) and :class:`MetricsEndpoint` (a prometheus_client HTTP server on a free loopback
port).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from daemon.ports import free_port
from ops.metrics_catalog import Catalog, MetricType

DEFAULT_BINARY = "/usr/bin/prometheus"
_ZERO_TIME = "0001-01-01T00:00:00Z"  # lastEvaluation of a rule never evaluated


class PrometheusError(RuntimeError):
    """The test Prometheus server failed to start, answer, or reach a condition in time."""


class PrometheusQueryError(PrometheusError):
    """Prometheus rejected a query (bad PromQL, or an evaluation error)."""


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` binary, or ``None`` when it is not installed."""
    found = shutil.which("prometheus")
    if found:
        return found
    return DEFAULT_BINARY if os.access(DEFAULT_BINARY, os.X_OK) else None


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


class PrometheusServer:
    """One Prometheus process scraping ``targets``; stop it with :meth:`stop` or ``with``."""

    def __init__(
        self,
        targets: list[str],
        scrape_interval_seconds: float = 1,
        rule_files: Sequence[str | Path] = (),
        *,
        startup_timeout_seconds: float = 30,
        binary: str | None = None,
    ) -> None:
        self.targets = list(targets)
        self.scrape_interval_seconds = scrape_interval_seconds
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.startup_timeout_seconds = startup_timeout_seconds
        self.binary = binary or prometheus_binary()
        self.port = 0
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self._workdir is not None, "server not started"
        return self._workdir / "prometheus.log"

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, *, attempts: int = 3) -> PrometheusServer:
        """Start and wait for readiness; retry on a port taken between choosing and binding."""
        if self.binary is None:
            raise PrometheusError("the prometheus binary is not installed (Debian: prometheus)")
        self._workdir = Path(tempfile.mkdtemp(prefix="elasticd-prometheus-"))
        self._write_config()
        for attempt in range(attempts):
            self.port = free_port()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except PrometheusError:
                address_taken = "address already in use" in self.log_tail()
                self._terminate()
                if not address_taken or attempt == attempts - 1:
                    self.stop()
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the process and remove its work directory (TSDB, config, log)."""
        self._terminate()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _write_config(self) -> None:
        assert self._workdir is not None
        interval = _duration(self.scrape_interval_seconds)
        config = {
            "global": {
                "scrape_interval": interval,
                # Must not exceed the interval; the targets are on loopback.
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": "elasticd", "static_configs": [{"targets": self.targets}]}
            ],
        }
        (self._workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")

    def _spawn(self) -> None:
        assert self._workdir is not None and self.binary is not None
        command = [
            self.binary,
            f"--config.file={self._workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self._workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_seconds
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise PrometheusError(f"prometheus exited early: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise PrometheusError(
            f"prometheus not ready after {self.startup_timeout_seconds}s: {self.log_tail()}"
        )

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def log_tail(self, size_bytes: int = 4000) -> str:
        """The end of the server's log (empty when there is none yet)."""
        if self._workdir is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-size_bytes:].decode("utf-8", "replace")

    # --- HTTP API --------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc).get("error", str(exc))
            except ValueError:
                message = str(exc)
            raise PrometheusQueryError(f"{path} {params}: {message}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise PrometheusError(f"{path}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{path} {params}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, *, at_unix_seconds: float | None = None) -> list[dict[str, Any]]:
        """Evaluate ``expr`` now (or at a time); a list of ``{"metric", "value"}`` series.

        A scalar or string result comes back as one series with empty ``metric``.
        """
        params = {"query": expr}
        if at_unix_seconds is not None:
            params["time"] = str(at_unix_seconds)
        data = self._get("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def wait_for(
        self, expr: str, *, timeout_seconds: float = 30, poll_seconds: float = 0.2
    ) -> list[dict[str, Any]]:
        """Poll until ``expr`` returns at least one series; return them (bounded wait)."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            series = self.query(expr)
            if series:
                return series
            if time.monotonic() >= deadline:
                raise PrometheusError(f"{expr!r} returned no series within {timeout_seconds}s")
            time.sleep(poll_seconds)

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule (flattened over groups) with health, lastError, lastEvaluation."""
        groups = self._get("/api/v1/rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def wait_rules_evaluated(self, *, timeout_seconds: float = 30) -> list[dict[str, Any]]:
        """Poll until every loaded rule has been evaluated at least once; return the rules."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            rules = self.rules()
            if rules and all(r.get("lastEvaluation", _ZERO_TIME) != _ZERO_TIME for r in rules):
                return rules
            if time.monotonic() >= deadline:
                raise PrometheusError(f"rules not all evaluated within {timeout_seconds}s")
            time.sleep(0.2)

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        return list(self._get("/api/v1/alerts")["alerts"])

    def active_targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets")["activeTargets"])

    def watch(self, expr: str, *, poll_seconds: float = 0.2) -> ExpressionWatch:
        """Start polling ``expr`` in a background thread (see :class:`ExpressionWatch`)."""
        return ExpressionWatch(self, expr, poll_seconds=poll_seconds).start()


@dataclasses.dataclass(frozen=True)
class Answer:
    """One poll of an :class:`ExpressionWatch`: evaluation time and the series' label sets."""

    eval_unix_seconds: float
    series: tuple[dict[str, str], ...]


class ExpressionWatch:
    """Polls one instant query every ``poll_seconds`` until :meth:`stop`; keeps every answer.

    The time of an answer is Prometheus' own evaluation time (the timestamp of the returned
    samples; for an empty answer the midpoint of the request), the moment at which a rule
    evaluated with that expression would have seen the same thing.
    """

    def __init__(self, server: PrometheusServer, expr: str, *, poll_seconds: float = 0.2) -> None:
        self.server = server
        self.expr = expr
        self.poll_seconds = poll_seconds
        self.errors: list[str] = []
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prometheus-watch", daemon=True)

    def __enter__(self) -> ExpressionWatch:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> ExpressionWatch:
        """Start polling (a no-op when already started)."""
        if self._thread.ident is None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def _loop(self) -> None:
        while not self._stop.is_set():
            sent = time.time()
            try:
                result = self.server.query(self.expr)
            except PrometheusError as exc:
                # A failed poll is a gap in the record, kept for the test to report.
                self.errors.append(str(exc))
            else:
                midpoint = (sent + time.time()) / 2
                evaluated = float(result[0]["value"][0]) if result else midpoint
                answer = Answer(evaluated, tuple(dict(s["metric"]) for s in result))
                with self._lock:
                    self._answers.append(answer)
            self._stop.wait(self.poll_seconds)

    def answers(self) -> list[Answer]:
        with self._lock:
            return list(self._answers)

    def first_seen(self, *, after_unix_seconds: float = 0.0, **labels: str) -> float | None:
        """Evaluation time of the first answer after a time holding a series with ``labels``."""
        for answer in self.answers():
            if answer.eval_unix_seconds >= after_unix_seconds and _holds(answer, labels):
                return answer.eval_unix_seconds
        return None

    def last_answer_before(self, unix_seconds: float) -> Answer | None:
        """The newest answer evaluated before ``unix_seconds`` (``None`` when there is none)."""
        earlier = [a for a in self.answers() if a.eval_unix_seconds < unix_seconds]
        return earlier[-1] if earlier else None

    def wait_seen(
        self, *, timeout_seconds: float, after_unix_seconds: float = 0.0, **labels: str
    ) -> float:
        """Block until :meth:`first_seen` has an answer; raise after ``timeout_seconds``."""
        deadline = time.monotonic() + timeout_seconds
        while (seen := self.first_seen(after_unix_seconds=after_unix_seconds, **labels)) is None:
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"{self.expr!r} showed no series with {labels} within {timeout_seconds}s"
                    f" (poll errors: {self.errors[-3:]})"
                )
            time.sleep(self.poll_seconds / 2)
        return seen


def _holds(answer: Answer, labels: dict[str, str]) -> bool:
    return any(all(s.get(k) == v for k, v in labels.items()) for s in answer.series)


# --- something to scrape -------------------------------------------------------------------


def catalog_registry(
    catalog: Catalog, *, run_id: str = "run0", node: str = "node0"
) -> tuple[CollectorRegistry, dict[str, Any]]:
    """A fresh registry with every catalog metric, and the metric objects by name.

    Each closed label value gets a child at 0 (as the daemon must), an open label (``source``)
    one child named ``eval``; so every metric exposes at least one series.
    """
    registry = CollectorRegistry()
    objects: dict[str, Any] = {}
    for metric in catalog.metrics:
        names = list(metric.label_names)
        kwargs: dict[str, Any] = {"registry": registry}
        if metric.type is MetricType.HISTOGRAM:
            kwargs["buckets"] = metric.buckets
        kind = {MetricType.COUNTER: Counter, MetricType.GAUGE: Gauge}.get(metric.type, Histogram)
        obj = kind(metric.name, metric.help, names, **kwargs)
        objects[metric.name] = obj
        for combo in _label_combinations(metric):
            obj.labels(run_id=run_id, node=node, **combo)
    return registry, objects


def _label_combinations(metric: Any) -> list[dict[str, str]]:
    combos: list[dict[str, str]] = [{}]
    for label in metric.labels:
        values = label.values or ("eval",)
        combos = [{**c, label.name: v} for c in combos for v in values]
    return combos


class MetricsEndpoint:
    """A prometheus_client HTTP server for ``registry`` on a free 127.0.0.1 port."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: Any = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> MetricsEndpoint:
        self._server, _thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.target}/metrics", timeout=5) as response:
            return response.read().decode("utf-8")
