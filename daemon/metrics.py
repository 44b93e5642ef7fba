"""The node's Prometheus metrics: the daemon's own, and its workers' read from their log lines.

Workers do not serve metrics: every worker line already passes through the daemon (the relay),
so the daemon updates training gauges from the protocol's metric events
(:data:`elastic.protocol.METRIC_EVENTS`: ``step``, ``eval``, ``divergence``, ``rewind``,
``diverged`` and ``checkpoint_*``). One scrape endpoint per node, no multiprocess files, and a
worker that dies cannot leave stale series behind.

The collectors are built from ``daemon/metrics.yaml`` (names, types, help, labels, buckets): the
one list that ``ops`` checks its alert rules and dashboard against. Every series carries
``run_id`` and ``node``; no step, pid or path labels.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from elastic.protocol import Event

CATALOG = Path(__file__).with_name("metrics.yaml")
_TYPES: dict[str, Any] = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}


@cache
def catalog() -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """(common labels, {metric name: spec}) from ``daemon/metrics.yaml``."""
    data = yaml.safe_load(CATALOG.read_text(encoding="utf-8"))
    return tuple(data["common_labels"]), {m["name"]: m for m in data["metrics"]}


def build_labels() -> dict[str, str]:
    """``elasticd_build_info``'s labels: the installed distributions' versions (torch's from
    its metadata: the daemon does not import torch), ``unknown`` when one is not installed."""
    return {
        "version": _distribution_version("elasticd"),
        "python": platform.python_version(),
        "torch": _distribution_version("torch"),
    }


def _distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _label_values(name: str, label: str) -> tuple[str, ...]:
    return tuple(catalog()[1][name].get("labels", {}).get(label) or ())


class NodeMetrics:
    """All ``elasticd_*`` series of one node, on an injected registry."""

    def __init__(
        self,
        *,
        run_id: str,
        node: str,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        build: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._clock = clock
        self._labels = {"run_id": run_id, "node": node}
        common, specs = catalog()
        self._m: dict[str, Any] = {name: self._build(spec, common) for name, spec in specs.items()}
        self._progress_step = 0
        self._badput_exported: dict[str, float] = {}
        self._run_scoped = frozenset(n for n, spec in specs.items() if spec.get("scope") == "run")
        self.hosts_rank0 = False  # run-scoped series exist only while this is True
        self._init_series()
        self.series("elasticd_build_info", **(build or build_labels())).set(1)

    def _build(self, spec: dict[str, Any], common: tuple[str, ...]) -> Any:
        labels = [*common, *spec.get("labels", {})]
        kwargs: dict[str, Any] = {"registry": self.registry}
        if spec["type"] == "histogram":
            kwargs["buckets"] = tuple(spec["buckets"])
        name = spec["name"].removesuffix("_total") if spec["type"] == "counter" else spec["name"]
        return _TYPES[spec["type"]](name, spec["help"], labels, **kwargs)

    def _init_series(self) -> None:
        # Every closed label value and every unlabelled series exists from the start at 0, so
        # rules see zeros rather than gaps and increase() sees a counter's first event. Not the
        # run-scoped ones: they appear when this node hosts rank 0 (set_hosts_rank0).
        self._create_series(set(catalog()[1]) - self._run_scoped)
        self.set_state("starting")

    def _create_series(self, names: set[str]) -> None:
        _, specs = catalog()
        for name, spec in specs.items():
            if name not in names:
                continue
            closed = {k: v for k, v in spec.get("labels", {}).items() if v}
            open_labels = set(spec.get("labels", {})) - set(closed)
            if open_labels:
                continue  # e.g. eval source: created when the first value arrives
            if not closed:
                self.series(name)
            for label, values in closed.items():
                for value in values:
                    self.series(name, **{label: value})

    def set_hosts_rank0(self, hosts: bool) -> None:
        """Whether this node's workers include global rank 0 (new each round). Gaining it
        creates the run-scoped series (guard ``ok`` until the workers say otherwise); losing
        it removes them: another node reports the run now, nothing stale stays here."""
        if hosts == self.hosts_rank0:
            return
        self.hosts_rank0 = hosts
        if hosts:
            # Not the plain gauges (loss, lr, ...): a 0 there would draw a flat-zero line until
            # the first step; they appear with their first value.
            _, specs = catalog()
            self._create_series(
                {
                    n
                    for n in self._run_scoped
                    if specs[n]["type"] != "gauge" or specs[n].get("labels")
                }
            )
            self.set_guard_state("ok")
        else:
            for name in self._run_scoped:
                self._m[name].clear()

    def series(self, name: str, **extra: str) -> Any:
        """The child of metric ``name`` for this node (and ``extra`` labels)."""
        return self._m[name].labels(**self._labels, **extra)

    def _one_hot(self, name: str, current: str) -> None:
        for value in _label_values(name, "state"):
            self.series(name, state=value).set(1 if value == current else 0)

    def set_state(self, state: str) -> None:
        self._one_hot("elasticd_daemon_state", state)

    def set_guard_state(self, state: str) -> None:
        self._one_hot("elasticd_guard_state", state)

    def set_group(self, *, nodes: int, world_size: int, min_nodes: int, max_nodes: int) -> None:
        self.series("elasticd_group_nodes").set(nodes)
        self.series("elasticd_group_world_size").set(world_size)
        self.series("elasticd_group_min_nodes").set(min_nodes)
        self.series("elasticd_group_max_nodes").set(max_nodes)

    def observe_round(self, seconds: float) -> None:
        self.series("elasticd_rendezvous_rounds_total").inc()
        self.series("elasticd_rendezvous_duration_seconds").observe(seconds)

    def count_restart(self, reason: str) -> None:
        self.series("elasticd_worker_restarts_total", reason=reason).inc()

    def set_etcd_up(self, up: bool) -> None:
        self.series("elasticd_etcd_up").set(1 if up else 0)

    def set_straggler(
        self, *, compute_seconds: float | None, ratio: float | None, straggler: bool, became: bool
    ) -> None:
        """This node's straggler score (daemon/stragglers.py); unknown values read 0."""
        self.series("elasticd_node_step_compute_seconds").set(compute_seconds or 0.0)
        self.series("elasticd_node_straggler_ratio").set(ratio or 0.0)
        self.series("elasticd_node_straggler").set(1 if straggler else 0)
        if became:
            self.series("elasticd_node_straggler_events_total").inc()

    def set_goodput(
        self, *, wall_seconds: float, productive_seconds: float, badput_seconds: Mapping[str, float]
    ) -> None:
        """The node's goodput ledger (daemon/goodput.py): badput totals only grow."""
        self.series("elasticd_goodput_wall_seconds").set(wall_seconds)
        self.series("elasticd_goodput_productive_seconds").set(productive_seconds)
        ratio = productive_seconds / wall_seconds if wall_seconds > 0 else 0.0
        self.series("elasticd_goodput_ratio").set(ratio)
        for kind, seconds in badput_seconds.items():
            delta = seconds - self._badput_exported.get(kind, 0.0)
            if delta > 0:
                self.series("elasticd_badput_seconds_total", kind=kind).inc(delta)
                self._badput_exported[kind] = seconds

    def set_node_rate(
        self, *, step_seconds: float, tokens_per_second: float, heartbeat_age_seconds: float
    ) -> None:
        """What this node's own ranks show (every node): step time, throughput share, beats."""
        self.series("elasticd_node_step_seconds").set(step_seconds)
        self.series("elasticd_node_tokens_per_second").set(tokens_per_second)
        self.series("elasticd_worker_heartbeat_age_seconds").set(heartbeat_age_seconds)

    def set_worker_memory(self, peak_memory_bytes: Iterable[int | None]) -> None:
        """The largest of this node's workers' peak memory (heartbeats); unknown ones skipped,
        and the gauge keeps its last value while none is known (between rounds)."""
        known = [m for m in peak_memory_bytes if m is not None]
        if known:
            self.series("elasticd_worker_peak_memory_bytes").set(max(known))

    def set_progress(self, step: int) -> None:
        """Step progress from this node's heartbeats (every node, not only rank 0's)."""
        if step > self._progress_step:
            self._progress_step = step
            self.series("elasticd_train_step").set(step)
            self.series("elasticd_train_last_step_timestamp_seconds").set(self._clock())

    def on_worker_line(self, record: dict[str, Any]) -> None:
        """Update training series from one relayed worker line (the run-scoped ones only on
        the node hosting rank 0, the only rank that prints these events)."""
        if not self.hosts_rank0:
            return
        # Event is a StrEnum: a record's plain string finds its member's handler.
        handler = _HANDLERS.get(str(record.get("event")))
        if handler is not None:
            handler(self, record)

    def _on_step(self, r: dict[str, Any]) -> None:
        self._progress_step = int(r["step"])
        self.series("elasticd_train_step").set(r["step"])
        self.series("elasticd_train_last_step_timestamp_seconds").set(self._clock())
        for name, key in _STEP_GAUGES:
            if _is_number(r.get(key)):
                self.series(name).set(r[key])
        if _is_number(r.get("step_seconds")):
            self.series("elasticd_train_step_duration_seconds").observe(r["step_seconds"])
        if _is_number(r.get("tokens")) and r["tokens"] > 0:
            self.series("elasticd_train_tokens_total").inc(r["tokens"])
        if r.get("skipped"):
            self.series("elasticd_guard_skipped_steps_total").inc()

    def _on_eval(self, r: dict[str, Any]) -> None:
        for source, loss in (r.get("losses") or {}).items():
            self.series("elasticd_eval_loss", source=str(source)).set(loss)

    def _on_divergence(self, r: dict[str, Any]) -> None:
        kind = str(r.get("kind"))
        if kind in _label_values("elasticd_guard_divergence_events_total", "kind"):
            self.series("elasticd_guard_divergence_events_total", kind=kind).inc()
        self.set_guard_state("watching")

    def _on_rewind(self, r: dict[str, Any]) -> None:
        self.series("elasticd_guard_rewinds_total").inc()
        self.set_guard_state("rewinding")

    def _on_diverged(self, r: dict[str, Any]) -> None:
        self.set_guard_state("diverged")

    def _on_commit(self, r: dict[str, Any]) -> None:
        self.series("elasticd_checkpoint_last_committed_step").set(r.get("step", 0))
        self.series("elasticd_checkpoint_last_commit_timestamp_seconds").set(self._clock())
        if _is_number(r.get("duration_seconds")):
            self.series("elasticd_checkpoint_save_duration_seconds").observe(r["duration_seconds"])
        if _is_number(r.get("size_bytes")):
            self.series("elasticd_checkpoint_saved_bytes_total").inc(r["size_bytes"])

    def _on_load(self, r: dict[str, Any]) -> None:
        if _is_number(r.get("duration_seconds")):
            self.series("elasticd_checkpoint_load_duration_seconds").observe(r["duration_seconds"])

    def _on_known_good(self, r: dict[str, Any]) -> None:
        self.series("elasticd_checkpoint_last_known_good_step").set(r.get("step", 0))
        self.set_guard_state("ok")


_STEP_GAUGES = (
    ("elasticd_train_loss", "loss"),
    ("elasticd_train_grad_norm", "grad_norm"),
    ("elasticd_train_learning_rate", "lr"),
    ("elasticd_train_tokens_per_second", "tokens_per_s"),
    ("elasticd_train_mfu_ratio", "mfu"),
    ("elasticd_train_total_steps", "total_steps"),
)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# One handler per event of METRIC_EVENTS (tests/daemon/test_metrics.py holds them equal).
_HANDLERS: dict[str, Callable[[NodeMetrics, dict[str, Any]], None]] = {
    Event.STEP: NodeMetrics._on_step,
    Event.EVAL: NodeMetrics._on_eval,
    Event.DIVERGENCE: NodeMetrics._on_divergence,
    Event.REWIND: NodeMetrics._on_rewind,
    Event.DIVERGED: NodeMetrics._on_diverged,
    Event.CHECKPOINT_COMMIT: NodeMetrics._on_commit,
    Event.CHECKPOINT_LOAD: NodeMetrics._on_load,
    Event.CHECKPOINT_KNOWN_GOOD: NodeMetrics._on_known_good,
}
