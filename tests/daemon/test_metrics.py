"""The daemon's /metrics exposition matches daemon/metrics.yaml, and worker lines update it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from daemon import metrics as metrics_module
from daemon.metrics import NodeMetrics
from elastic.protocol import METRIC_EVENTS
from ops import metrics_catalog


def scrape(metrics: NodeMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def value(metrics: NodeMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"run_id": "r", "node": "n", **labels})


def fresh(*, hosts_rank0: bool = True) -> NodeMetrics:
    metrics = NodeMetrics(run_id="r", node="n", registry=CollectorRegistry(), clock=lambda: 1000.0)
    metrics.set_hosts_rank0(hosts_rank0)
    return metrics


RUN_SCOPED = sorted(m.name for m in metrics_catalog.load().metrics if m.scope == "run")
STEP_LINE = {"event": "step", "step": 7, "loss": 3.5, "grad_norm": 1.2, "lr": 0.001}


def families(metrics: NodeMetrics) -> set[str]:
    """Metric names with at least one sample in the exposition."""
    return {m.name for m in metrics.registry.collect() if m.samples}


def test_exposition_matches_the_catalog_exactly() -> None:
    metrics = fresh()
    metrics.on_worker_line({**STEP_LINE, "tokens_per_s": 900.0})
    metrics.on_worker_line({"event": "checkpoint_commit", "step": 5})
    metrics.on_worker_line({"event": "checkpoint_known_good", "step": 5})
    metrics.on_worker_line({"event": "eval", "losses": {"code": 2.5}})
    problems = metrics_catalog.exposition_problems(
        scrape(metrics), metrics_catalog.load(), require_all=True
    )
    assert problems == []


def test_closed_label_values_exist_at_zero_before_any_event() -> None:
    metrics = fresh()
    assert value(metrics, "elasticd_worker_restarts_total", reason="hang") == 0
    assert value(metrics, "elasticd_guard_divergence_events_total", kind="nan") == 0
    assert value(metrics, "elasticd_daemon_state", state="starting") == 1
    assert value(metrics, "elasticd_daemon_state", state="running") == 0


def test_step_and_divergence_lines_update_training_series() -> None:
    metrics = fresh()
    metrics.on_worker_line(
        {
            "event": "step",
            "step": 7,
            "loss": 3.5,
            "grad_norm": 1.2,
            "lr": 0.001,
            "tokens_per_s": 900.0,
            "step_seconds": 0.02,
            "skipped": True,
        }
    )
    metrics.on_worker_line({"event": "divergence", "kind": "nan"})
    metrics.on_worker_line({"event": "rewind", "to_step": 3})
    assert value(metrics, "elasticd_train_step") == 7
    assert value(metrics, "elasticd_train_loss") == 3.5
    assert value(metrics, "elasticd_train_last_step_timestamp_seconds") == 1000.0
    assert value(metrics, "elasticd_guard_skipped_steps_total") == 1
    assert value(metrics, "elasticd_guard_divergence_events_total", kind="nan") == 1
    assert value(metrics, "elasticd_guard_rewinds_total") == 1
    assert value(metrics, "elasticd_guard_state", state="rewinding") == 1


def test_state_gauge_is_one_hot() -> None:
    metrics = fresh()
    metrics.set_state("running")
    metrics.set_state("draining")
    states = {
        s.labels["state"]: s.value
        for family in metrics.registry.collect()
        if family.name == "elasticd_daemon_state"
        for s in family.samples
    }
    assert states["draining"] == 1
    assert sum(states.values()) == 1


def test_every_metric_event_of_the_protocol_has_a_handler() -> None:
    assert set(metrics_module._HANDLERS) == METRIC_EVENTS


def test_a_loops_own_events_and_plain_output_update_nothing() -> None:
    metrics = fresh()
    before = scrape(metrics)
    metrics.on_worker_line({"event": "my_loop_event", "step": 7})
    metrics.on_worker_line({"event": "worker_output", "text": "hello"})
    metrics.on_worker_line({"text": "no event at all"})
    assert scrape(metrics) == before


def test_run_level_series_are_absent_on_a_node_without_rank_0() -> None:
    metrics = fresh(hosts_rank0=False)
    metrics.on_worker_line(STEP_LINE)  # a stray line changes nothing either
    names = {n.removesuffix("_total") for n in RUN_SCOPED}
    assert not names & families(metrics), "run-level series exported by a non-rank-0 node"
    assert value(metrics, "elasticd_train_loss") is None
    assert value(metrics, "elasticd_guard_state", state="ok") is None
    assert value(metrics, "elasticd_worker_restarts_total", reason="crash") == 0  # node's own
    problems = metrics_catalog.exposition_problems(scrape(metrics), metrics_catalog.load())
    assert problems == []


def test_rank_0_moving_away_leaves_nothing_stale_and_moving_back_starts_clean() -> None:
    metrics = fresh()
    metrics.on_worker_line(STEP_LINE)
    metrics.on_worker_line({"event": "checkpoint_commit", "step": 5})
    metrics.on_worker_line({"event": "diverged"})
    assert value(metrics, "elasticd_train_loss") == 3.5
    metrics.set_hosts_rank0(False)  # the next round puts rank 0 on another node
    assert value(metrics, "elasticd_train_loss") is None
    assert value(metrics, "elasticd_checkpoint_last_committed_step") is None
    assert value(metrics, "elasticd_guard_state", state="diverged") is None
    assert value(metrics, "elasticd_train_step") == 7  # the node's own progress stays
    metrics.set_hosts_rank0(True)
    assert value(metrics, "elasticd_guard_state", state="ok") == 1
    assert value(metrics, "elasticd_guard_state", state="diverged") == 0
    assert value(metrics, "elasticd_guard_rewinds_total") == 0
    assert value(metrics, "elasticd_train_loss") is None  # until rank 0 reports again


def test_node_rate_series() -> None:
    metrics = fresh(hosts_rank0=False)
    metrics.set_node_rate(step_seconds=0.5, tokens_per_second=1536.0, heartbeat_age_seconds=0.2)
    assert value(metrics, "elasticd_node_step_seconds") == 0.5
    assert value(metrics, "elasticd_node_tokens_per_second") == 1536.0
    assert value(metrics, "elasticd_worker_heartbeat_age_seconds") == 0.2


def test_build_info_is_one_series_at_1_naming_the_versions() -> None:
    build = {"version": "9.9.9", "python": "3.11.7", "torch": "2.99.0"}
    metrics = NodeMetrics(run_id="r", node="n", registry=CollectorRegistry(), build=build)
    assert value(metrics, "elasticd_build_info", **build) == 1
    samples = [s for m in metrics.registry.collect() for s in m.samples]
    assert [s.labels for s in samples if s.name == "elasticd_build_info"] == [
        {"run_id": "r", "node": "n", **build}
    ]


def test_build_labels_read_the_installed_versions() -> None:
    import platform
    from importlib import metadata

    labels = metrics_module.build_labels()
    assert labels["python"] == platform.python_version()
    assert labels["torch"] == metadata.version("torch")
    assert labels["version"] == metadata.version("elasticd")


def test_step_lines_count_tokens_and_set_mfu_and_total_steps() -> None:
    metrics = fresh()
    assert value(metrics, "elasticd_train_tokens_total") == 0  # a counter exists from the start
    assert value(metrics, "elasticd_train_mfu_ratio") is None  # gauges appear with a value
    line = {**STEP_LINE, "tokens": 4096, "flops": 1e12, "mfu": 0.42, "total_steps": 1000}
    metrics.on_worker_line(line)
    metrics.on_worker_line({**line, "step": 8, "tokens": 2048, "mfu": 0.4})
    metrics.on_worker_line({**STEP_LINE, "step": 9})  # a loop that does not count tokens
    assert value(metrics, "elasticd_train_tokens_total") == 6144
    assert value(metrics, "elasticd_train_mfu_ratio") == 0.4
    assert value(metrics, "elasticd_train_total_steps") == 1000


def test_worker_peak_memory_is_the_largest_known_and_kept_while_unknown() -> None:
    metrics = fresh(hosts_rank0=False)
    assert value(metrics, "elasticd_worker_peak_memory_bytes") == 0
    metrics.set_worker_memory([3 << 30, None, 5 << 30])
    assert value(metrics, "elasticd_worker_peak_memory_bytes") == 5 << 30
    metrics.set_worker_memory([None])  # between rounds, or a loop that does not report it
    assert value(metrics, "elasticd_worker_peak_memory_bytes") == 5 << 30
