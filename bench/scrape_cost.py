"""Cost of one scrape of a node's ``/metrics`` holding the metrics of 8 workers (issue 6).

Usage: ``python bench/scrape_cost.py [--workers 8] [--eval-sources 6] [--requests 200]
[--lines-per-second 400]``

A :class:`daemon.metrics.NodeMetrics` is fed what a node with ``--workers`` workers reports:
every worker's step, eval (``--eval-sources`` sources), divergence (every kind), rewind,
diverged and checkpoint lines, plus the daemon's own updates (every lifecycle and guard state,
every restart reason, rounds, group sizes), so every label value of ``daemon/metrics.yaml`` has
a series and every histogram has observations across its buckets. Its registry is served by the
daemon's own :class:`daemon.http.StatusServer` on 127.0.0.1, and ``--requests`` GETs of
``/metrics`` are timed one after another (a new connection each: the server speaks HTTP/1.0),
after a few unmeasured ones.

Settings, all measured in the same run:

- ``empty registry``: the same server with no metrics, the HTTP floor (baseline);
- ``8 workers, idle``: the fed registry;
- ``8 workers, relaying``: the same while a thread keeps feeding worker lines at
  ``--lines-per-second`` (the daemon's relay threads update metrics while Prometheus scrapes,
  and both need the GIL);
- ``generate_latest() only``: rendering the fed registry without HTTP.

Reported per setting: median, p99 (nearest rank) and max in milliseconds. The metrics carry no
rank label, so the series count does not grow with the number of workers; ``--eval-sources``
(an open label) does. Prints a table on stdout and one JSON summary line last. The issue's
target: median under 50 ms with 8 workers (tests/ops/test_prometheus_e2e.py asserts it).

For ``python -m bench``: :func:`run` returns the harness's ``Section`` (imported only there, so
this script also runs on its own).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.http import StatusServer
from daemon.metrics import NodeMetrics, catalog

TARGET_MEDIAN_SECONDS = 0.050
WARMUP_REQUESTS = 5


@dataclass(frozen=True)
class Timing:
    """Latency of one setting over its requests, in milliseconds."""

    setting: str
    requests: int
    median_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class ScrapeCost:
    """The result: one :class:`Timing` per setting and the size of the fed exposition."""

    workers: int
    eval_sources: int
    body_bytes: int
    num_samples: int
    timings: tuple[Timing, ...]

    def timing(self, setting: str) -> Timing:
        return next(t for t in self.timings if t.setting == setting)


# --- what 8 workers and their daemon report -------------------------------------------------


def _label_values(name: str, label: str) -> list[str]:
    return list(catalog()[1][name]["labels"][label])


def worker_lines(rank: int, step: int, *, eval_sources: int) -> list[dict[str, Any]]:
    """The lines one worker writes around ``step``, one of each kind the metrics read."""
    tagged = {"rank": rank, "node": "node0", "step": step}
    lines: list[dict[str, Any]] = [
        {
            **tagged,
            "event": "step",
            "loss": 3.0 - step * 1e-4 + rank * 1e-3,
            "grad_norm": 0.4 + rank * 0.01,
            "lr": 3e-4,
            "world_size": 64,
            "tokens_per_s": 1.2e5,
            # Spread over the histogram's buckets (5 ms .. 60 s).
            "step_seconds": 0.004 * 2 ** ((step + rank) % 14),
            "skipped": step % 7 == 0,
        },
        {
            **tagged,
            "event": "eval",
            "losses": {f"source_{i}": 3.0 + i * 0.1 for i in range(eval_sources)},
        },
        {**tagged, "event": "rewind", "to_step": max(0, step - 100)},
        {**tagged, "event": "diverged", "reasons": ["budget"]},
        {
            **tagged,
            "event": "checkpoint_commit",
            "size_bytes": 1 << 30,
            "duration_seconds": 0.05 * 2 ** (step % 16),
        },
        {**tagged, "event": "checkpoint_load", "duration_seconds": 0.05 * 2 ** (rank % 16)},
        {**tagged, "event": "checkpoint_known_good"},
    ]
    kinds = _label_values("elasticd_guard_divergence_events_total", "kind")
    lines += [{**tagged, "event": "divergence", "kind": kind} for kind in kinds]
    return lines


def feed_daemon(metrics: NodeMetrics) -> None:
    """The daemon's own updates: every state, every restart reason, rounds, group sizes."""
    for state in _label_values("elasticd_daemon_state", "state"):
        metrics.set_state(state)
    metrics.set_state("running")
    for reason in _label_values("elasticd_worker_restarts_total", "reason"):
        metrics.count_restart(reason)
    for i in range(12):
        metrics.observe_round(0.05 * 2**i)
    metrics.set_group(nodes=8, world_size=64, min_nodes=4, max_nodes=8)
    metrics.set_etcd_up(True)


def fed_node(*, workers: int, eval_sources: int, steps: int = 50) -> NodeMetrics:
    """A node's metrics after ``steps`` steps of ``workers`` workers, on a fresh registry."""
    metrics = NodeMetrics(run_id="bench", node="node0", registry=CollectorRegistry())
    feed_daemon(metrics)
    for step in range(1, steps + 1):
        for rank in range(workers):
            for line in worker_lines(rank, step, eval_sources=eval_sources):
                metrics.on_worker_line(line)
    return metrics


@contextmanager
def relaying(
    metrics: NodeMetrics, *, workers: int, eval_sources: int, lines_per_second: float
) -> Iterator[None]:
    """Feed worker lines from a thread at about ``lines_per_second`` while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        step = 1000
        while not stop.is_set():
            batch = [
                line
                for rank in range(workers)
                for line in worker_lines(rank, step, eval_sources=eval_sources)
            ]
            for line in batch:
                metrics.on_worker_line(line)
            step += 1
            stop.wait(len(batch) / lines_per_second)

    thread = threading.Thread(target=loop, name="relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


# --- timing ---------------------------------------------------------------------------------


@contextmanager
def serving(registry: CollectorRegistry) -> Iterator[str]:
    """The daemon's StatusServer for ``registry`` on a free loopback port; yields its URL."""
    server = StatusServer(
        bind="127.0.0.1",
        port=0,
        registry=registry,
        status=lambda: {"state": "running"},
        ready=lambda: True,
    )
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}/metrics"
    finally:
        server.close()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def time_calls(call: Callable[[], object], *, requests: int) -> list[float]:
    """Seconds per call of ``call``, after :data:`WARMUP_REQUESTS` unmeasured ones."""
    for _ in range(WARMUP_REQUESTS):
        call()
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the second largest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def timing(setting: str, samples: Sequence[float]) -> Timing:
    return Timing(
        setting=setting,
        requests=len(samples),
        median_ms=round(statistics.median(samples) * 1000, 3),
        p99_ms=round(percentile(samples, 0.99) * 1000, 3),
        max_ms=round(max(samples) * 1000, 3),
    )


def measure(
    *,
    workers: int = 8,
    eval_sources: int = 6,
    requests: int = 200,
    lines_per_second: float = 400.0,
) -> ScrapeCost:
    """Time ``/metrics`` in every setting (see the module docstring)."""
    metrics = fed_node(workers=workers, eval_sources=eval_sources)
    body = generate_latest(metrics.registry)
    timings = []
    with serving(CollectorRegistry()) as url:
        timings.append(timing("empty registry", time_calls(lambda: get(url), requests=requests)))
    with serving(metrics.registry) as url:
        idle = time_calls(lambda: get(url), requests=requests)
        timings.append(timing(f"{workers} workers, idle", idle))
        with relaying(
            metrics, workers=workers, eval_sources=eval_sources, lines_per_second=lines_per_second
        ):
            busy = time_calls(lambda: get(url), requests=requests)
        timings.append(timing(f"{workers} workers, relaying {lines_per_second:g} lines/s", busy))
    rendering = time_calls(lambda: generate_latest(metrics.registry), requests=requests)
    timings.append(timing("generate_latest() only", rendering))
    num_samples = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    return ScrapeCost(workers, eval_sources, len(body), num_samples, tuple(timings))


def table(cost: ScrapeCost) -> str:
    rows = [
        f"/metrics: {cost.body_bytes} bytes, {cost.num_samples} samples "
        f"({cost.workers} workers, {cost.eval_sources} eval sources)",
        f"{'setting':<40} {'requests':>8} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}",
    ]
    rows += [
        f"{t.setting:<40} {t.requests:>8} {t.median_ms:>10.2f} {t.p99_ms:>8.2f} {t.max_ms:>8.2f}"
        for t in cost.timings
    ]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--eval-sources", type=int, default=6)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--lines-per-second", type=float, default=400.0)
    args = parser.parse_args(argv)
    cost = measure(
        workers=args.workers,
        eval_sources=args.eval_sources,
        requests=args.requests,
        lines_per_second=args.lines_per_second,
    )
    print(table(cost))
    fed = cost.timing(f"{cost.workers} workers, idle")
    met = fed.median_ms < TARGET_MEDIAN_SECONDS * 1000
    print(f"target: median < {TARGET_MEDIAN_SECONDS * 1000:g} ms: {'met' if met else 'NOT met'}")
    print(json.dumps({"bench": "scrape_cost", **asdict(cost), "target_met": met}))
    return 0


def run(work: Path, *, quick: bool) -> Any:
    """The ``python -m bench`` entry point: a ``bench.common.Section`` (``work`` is unused)."""
    from bench.common import Section, Target

    cost = measure(requests=50 if quick else 200)
    fed = cost.timing(f"{cost.workers} workers, idle")
    target = Target(
        "scrape /metrics, 8 workers",
        f"median < {TARGET_MEDIAN_SECONDS * 1000:g} ms",
        f"{fed.median_ms:.1f} ms (p99 {fed.p99_ms:.1f} ms)",
        fed.median_ms < TARGET_MEDIAN_SECONDS * 1000,
    )
    body = "```\n" + table(cost) + "\n```"
    return Section("scrape_cost", "Scrape cost", body, [target], data=asdict(cost))


if __name__ == "__main__":
    sys.exit(main())
