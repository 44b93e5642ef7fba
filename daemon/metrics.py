"""The node's Prometheus metrics: the daemon's own, and its workers' read from their log lines.

Workers do not serve metrics: every worker line already passes through the daemon (the relay),
so the daemon updates training gauges from ``step``, ``eval``, ``divergence``, ``rewind`` and
``checkpoint_*`` events. One scrape endpoint per node, no multiprocess files, and a worker that
dies cannot leave stale series behind.

Names, types and labels follow ``ops/metrics.yaml`` (a test keeps them in step). Every series
carries ``run_id`` and ``node``; no step, pid or path labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DAEMON_STATES = (
    "starting",
    "joining",
    "running",
    "draining",
    "waiting",
    "failed",
    "diverged",
    "stopped",
)
GUARD_STATES = ("ok", "watching", "rewinding", "diverged")
RESTART_REASONS = ("crash", "hang", "node_lost", "scale", "drain", "rewind")
DIVERGENCE_KINDS = ("nan", "loss_spike", "grad_spike", "sustained")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
IO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)


class NodeMetrics:
    """All ``elasticd_*`` series of one node, on an injected registry."""

    def __init__(
        self,
        *,
        run_id: str,
        node: str,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._clock = clock
        self._labels = {"run_id": run_id, "node": node}
        base = ["run_id", "node"]

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*base, *extra], registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*base, *extra], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, base, buckets=buckets, registry=self.registry)

        self.daemon_state = gauge(
            "elasticd_daemon_state", "1 for the daemon's current state", ("state",)
        )
        self.etcd_up = gauge("elasticd_etcd_up", "1 when the daemon reaches etcd")
        self.world_size = gauge("elasticd_group_world_size", "Worker processes in the group")
        self.nodes = gauge("elasticd_group_nodes", "Nodes in the current round")
        self.min_nodes = gauge("elasticd_group_min_nodes", "Configured minimum nodes")
        self.max_nodes = gauge("elasticd_group_max_nodes", "Configured maximum nodes")
        self.rounds = counter("elasticd_rendezvous_rounds_total", "Rendezvous rounds joined")
        self.round_seconds = histogram(
            "elasticd_rendezvous_duration_seconds", "Time to form a round", ROUND_BUCKETS
        )
        self.restarts = counter(
            "elasticd_worker_restarts_total", "Worker group restarts", ("reason",)
        )
        self.step = gauge("elasticd_train_step", "Last completed optimizer step")
        self.loss = gauge("elasticd_train_loss", "Training loss of the last step")
        self.grad_norm = gauge("elasticd_train_grad_norm", "Gradient norm before clipping")
        self.lr = gauge("elasticd_train_learning_rate", "Learning rate of the last step")
        self.tokens_per_second = gauge(
            "elasticd_train_tokens_per_second", "Global tokens per second of the last step"
        )
        self.step_seconds = histogram(
            "elasticd_train_step_duration_seconds", "Optimizer step wall time", STEP_BUCKETS
        )
        self.last_step_time = gauge(
            "elasticd_train_last_step_timestamp_seconds", "Unix time of the last completed step"
        )
        self.eval_loss = gauge("elasticd_eval_loss", "Held-out loss per data source", ("source",))
        self.save_seconds = histogram(
            "elasticd_checkpoint_save_duration_seconds", "Checkpoint save time", IO_BUCKETS
        )
        self.load_seconds = histogram(
            "elasticd_checkpoint_load_duration_seconds", "Checkpoint load time", IO_BUCKETS
        )
        self.saved_bytes = counter(
            "elasticd_checkpoint_saved_bytes_total", "Bytes of committed checkpoints"
        )
        self.last_committed = gauge(
            "elasticd_checkpoint_last_committed_step", "Step of the newest committed checkpoint"
        )
        self.last_known_good = gauge(
            "elasticd_checkpoint_last_known_good_step", "Step of the newest known-good checkpoint"
        )
        self.last_commit_time = gauge(
            "elasticd_checkpoint_last_commit_timestamp_seconds",
            "Unix time of the newest checkpoint commit",
        )
        self.divergence = counter(
            "elasticd_guard_divergence_events_total", "Anomalous steps seen by the guard", ("kind",)
        )
        self.skipped = counter("elasticd_guard_skipped_steps_total", "Optimizer steps skipped")
        self.rewinds = counter("elasticd_guard_rewinds_total", "Rewinds to a checkpoint")
        self.guard_state = gauge(
            "elasticd_guard_state", "1 for the guard's current state", ("state",)
        )
        self._init_series()

    def _init_series(self) -> None:
        # Create every labelled child up front so rules and dashboards see zeros, not gaps.
        for reason in RESTART_REASONS:
            self.restarts.labels(**self._labels, reason=reason)
        for kind in DIVERGENCE_KINDS:
            self.divergence.labels(**self._labels, kind=kind)
        for counter in (self.rounds, self.saved_bytes, self.skipped, self.rewinds):
            counter.labels(**self._labels)
        self.set_state("starting")
        self.set_guard_state("ok")
        self.etcd_up.labels(**self._labels).set(0)

    def _l(self, metric: Any, **extra: str) -> Any:
        return metric.labels(**self._labels, **extra)

    def set_state(self, state: str) -> None:
        for name in DAEMON_STATES:
            self._l(self.daemon_state, state=name).set(1 if name == state else 0)

    def set_guard_state(self, state: str) -> None:
        for name in GUARD_STATES:
            self._l(self.guard_state, state=name).set(1 if name == state else 0)

    def set_group(self, *, nodes: int, world_size: int, min_nodes: int, max_nodes: int) -> None:
        self._l(self.nodes).set(nodes)
        self._l(self.world_size).set(world_size)
        self._l(self.min_nodes).set(min_nodes)
        self._l(self.max_nodes).set(max_nodes)

    def observe_round(self, seconds: float) -> None:
        self._l(self.rounds).inc()
        self._l(self.round_seconds).observe(seconds)

    def count_restart(self, reason: str) -> None:
        self._l(self.restarts, reason=reason).inc()

    def set_etcd_up(self, up: bool) -> None:
        self._l(self.etcd_up).set(1 if up else 0)

    def on_worker_line(self, record: dict[str, Any]) -> None:
        """Update training series from one relayed worker line."""
        handler = _HANDLERS.get(str(record.get("event")))
        if handler is not None:
            handler(self, record)

    def _on_step(self, r: dict[str, Any]) -> None:
        self._l(self.step).set(r["step"])
        for gauge, key in (
            (self.loss, "loss"),
            (self.grad_norm, "grad_norm"),
            (self.lr, "lr"),
            (self.tokens_per_second, "tokens_per_s"),
        ):
            value = r.get(key)
            if isinstance(value, int | float):
                self._l(gauge).set(value)
        if isinstance(r.get("step_seconds"), int | float):
            self._l(self.step_seconds).observe(r["step_seconds"])
        self._l(self.last_step_time).set(self._clock())
        if r.get("skipped"):
            self._l(self.skipped).inc()

    def _on_eval(self, r: dict[str, Any]) -> None:
        for source, loss in (r.get("losses") or {}).items():
            self._l(self.eval_loss, source=str(source)).set(loss)

    def _on_divergence(self, r: dict[str, Any]) -> None:
        kind = str(r.get("kind") or "nan")
        if kind in DIVERGENCE_KINDS:
            self._l(self.divergence, kind=kind).inc()
        self.set_guard_state("watching")

    def _on_rewind(self, r: dict[str, Any]) -> None:
        self._l(self.rewinds).inc()
        self.set_guard_state("rewinding")

    def _on_diverged(self, r: dict[str, Any]) -> None:
        self.set_guard_state("diverged")

    def _on_commit(self, r: dict[str, Any]) -> None:
        self._l(self.last_committed).set(r.get("step", 0))
        self._l(self.last_commit_time).set(self._clock())
        if isinstance(r.get("duration_seconds"), int | float):
            self._l(self.save_seconds).observe(r["duration_seconds"])
        if isinstance(r.get("size_bytes"), int | float):
            self._l(self.saved_bytes).inc(r["size_bytes"])

    def _on_load(self, r: dict[str, Any]) -> None:
        if isinstance(r.get("duration_seconds"), int | float):
            self._l(self.load_seconds).observe(r["duration_seconds"])

    def _on_known_good(self, r: dict[str, Any]) -> None:
        self._l(self.last_known_good).set(r.get("checkpoint_step", 0))
        self.set_guard_state("ok")


_HANDLERS: dict[str, Callable[[NodeMetrics, dict[str, Any]], None]] = {
    "step": NodeMetrics._on_step,
    "eval": NodeMetrics._on_eval,
    "divergence": NodeMetrics._on_divergence,
    "rewind": NodeMetrics._on_rewind,
    "diverged": NodeMetrics._on_diverged,
    "checkpoint_commit": NodeMetrics._on_commit,
    "checkpoint_load": NodeMetrics._on_load,
    "checkpoint_known_good": NodeMetrics._on_known_good,
}
