"""daemon/metrics.yaml and ops/metrics_catalog.py: naming rules, PromQL and exposition checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ops import metrics_catalog as mc
from tests.support.prometheus import catalog_registry

ROOT = Path(__file__).resolve().parents[2]

# The metric names the daemon implements (the brief's list); a rename must be deliberate.
EXPECTED_NAMES = {
    "elasticd_build_info",
    "elasticd_daemon_state",
    "elasticd_etcd_up",
    "elasticd_group_world_size",
    "elasticd_group_nodes",
    "elasticd_group_min_nodes",
    "elasticd_group_max_nodes",
    "elasticd_rendezvous_rounds_total",
    "elasticd_rendezvous_duration_seconds",
    "elasticd_worker_restarts_total",
    "elasticd_train_step",
    "elasticd_train_loss",
    "elasticd_train_grad_norm",
    "elasticd_train_learning_rate",
    "elasticd_train_tokens_per_second",
    "elasticd_train_tokens_total",
    "elasticd_train_mfu_ratio",
    "elasticd_train_total_steps",
    "elasticd_worker_peak_memory_bytes",
    "elasticd_train_step_duration_seconds",
    "elasticd_train_last_step_timestamp_seconds",
    "elasticd_eval_loss",
    "elasticd_node_step_seconds",
    "elasticd_node_tokens_per_second",
    "elasticd_worker_heartbeat_age_seconds",
    "elasticd_node_step_compute_seconds",
    "elasticd_node_straggler_ratio",
    "elasticd_node_straggler",
    "elasticd_node_straggler_events_total",
    "elasticd_checkpoint_save_duration_seconds",
    "elasticd_checkpoint_load_duration_seconds",
    "elasticd_checkpoint_saved_bytes_total",
    "elasticd_checkpoint_last_committed_step",
    "elasticd_checkpoint_last_known_good_step",
    "elasticd_checkpoint_last_commit_timestamp_seconds",
    "elasticd_guard_divergence_events_total",
    "elasticd_guard_skipped_steps_total",
    "elasticd_guard_rewinds_total",
    "elasticd_guard_state",
    "elasticd_goodput_ratio",
    "elasticd_goodput_productive_seconds",
    "elasticd_goodput_wall_seconds",
    "elasticd_badput_seconds_total",
}


@pytest.fixture(scope="module")
def catalog() -> mc.Catalog:
    return mc.load()


def _raw() -> dict[str, Any]:
    return yaml.safe_load(mc.CATALOG_PATH.read_text(encoding="utf-8"))


def _problems_with(**entry: Any) -> list[str]:
    """Naming problems of a catalog holding only ``entry`` (defaults fill the rest)."""
    metric = {"name": "elasticd_test_thing", "type": "gauge", "help": "A thing.", **entry}
    return mc.naming_problems(mc.parse({"common_labels": ["run_id", "node"], "metrics": [metric]}))


def test_catalog_loads_and_breaks_no_naming_rule(catalog: mc.Catalog) -> None:
    assert mc.naming_problems(catalog) == []
    assert set(catalog.names()) == EXPECTED_NAMES
    assert len(catalog.names()) == len(EXPECTED_NAMES)


def test_every_metric_carries_run_id_and_node(catalog: mc.Catalog) -> None:
    assert catalog.common_labels == ("run_id", "node")
    assert all(m.label_names[:2] == ("run_id", "node") for m in catalog.metrics)


def test_closed_label_values_are_the_documented_ones(catalog: mc.Catalog) -> None:
    def values(metric: str, label: str) -> tuple[str, ...] | None:
        found = catalog.get(metric).label(label)
        assert found is not None
        return found.values

    daemon_states = "starting joining running draining waiting failed diverged stopped"
    assert values("elasticd_daemon_state", "state") == tuple(daemon_states.split())
    assert values("elasticd_guard_state", "state") == ("ok", "watching", "rewinding", "diverged")
    assert values("elasticd_worker_restarts_total", "reason") == (
        "crash",
        "hang",
        "node_lost",
        "scale",
        "drain",
    )  # no "rewind": a rewind restarts no worker (elasticd_guard_rewinds_total counts them)
    assert values("elasticd_guard_divergence_events_total", "kind") == (
        "nan",
        "loss_spike",
        "grad_spike",
        "sustained",
    )
    assert values("elasticd_eval_loss", "source") is None
    assert values("elasticd_badput_seconds_total", "kind") == (
        "startup",
        "rendezvous",
        "checkpoint_load",
        "recompute",
        "checkpoint_blocking",
        "hang_timeout",
        "paused",
        "degraded",
        "other",
    )


def test_types_follow_the_names(catalog: mc.Catalog) -> None:
    for metric in catalog.metrics:
        assert (metric.type is mc.MetricType.COUNTER) == metric.name.endswith("_total")
        assert (metric.type is mc.MetricType.HISTOGRAM) == bool(metric.buckets)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"name": "trainer_loss"}, "must start with 'elasticd_'"),
        ({"name": "elasticd_Train_loss"}, "snake case"),
        ({"name": "elasticd_loss"}, "elasticd_<subsystem>_<what>"),
        ({"name": "elasticd_test_events", "type": "counter"}, "end in '_total'"),
        ({"name": "elasticd_test_nodes_total"}, "end in '_total'"),
        ({"name": "elasticd_test_save_milliseconds"}, "non-base unit"),
        ({"name": "elasticd_test_saved_megabytes_total", "type": "counter"}, "non-base unit"),
        ({"name": "elasticd_test_save_duration"}, "must end in '_seconds'"),
        ({"name": "elasticd_test_last_step_timestamp"}, "must end in '_seconds'"),
        ({"name": "elasticd_test_thing_count"}, "derived-series suffix"),
        ({"labels": {"step": None}}, "'step' is forbidden"),
        ({"labels": {"pid": None}}, "'pid' is forbidden"),
        ({"labels": {"path": None}}, "'path' is forbidden"),
        ({"labels": {"le": None}}, "reserved by Prometheus"),
        ({"labels": {"instance": None}}, "reserved by Prometheus"),
        ({"labels": {"node": None}}, "repeats a common label"),
        ({"labels": {"state": []}}, "must not be empty"),
        ({"labels": {"state": ["Up", "down"]}}, "must be snake case"),
        ({"labels": {"state": ["up", "up"]}}, "must be unique"),
        ({"help": ""}, "must not be empty"),
        ({"help": "No full stop"}, "ending in '.'"),
        ({"buckets": [1, 2]}, "only histograms have buckets"),
        ({"name": "elasticd_test_duration_seconds", "type": "histogram"}, "needs buckets"),
        (
            {"name": "elasticd_test_duration_seconds", "type": "histogram", "buckets": [1, 1]},
            "strictly increasing",
        ),
        (
            {"name": "elasticd_test_duration_seconds", "type": "histogram", "buckets": [0, 1]},
            "finite and > 0",
        ),
    ],
)
def test_naming_rules_reject_a_bad_metric(entry: dict[str, Any], problem: str) -> None:
    problems = _problems_with(**entry)
    assert any(problem in p for p in problems), problems


def test_a_good_metric_has_no_problems() -> None:
    assert _problems_with() == []
    assert _problems_with(name="elasticd_test_saved_bytes_total", type="counter") == []


def test_naming_rules_reject_duplicates_and_series_collisions() -> None:
    raw = _raw()
    raw["metrics"].append(dict(raw["metrics"][0]))
    raw["metrics"].append(
        {"name": "elasticd_train_step_duration_seconds_count", "type": "gauge", "help": "X."}
    )
    problems = mc.naming_problems(mc.parse(raw))
    assert any("listed twice" in p for p in problems), problems
    assert any("collides with elasticd_train_step_duration_seconds" in p for p in problems)


def test_load_raises_naming_every_problem(tmp_path: Path) -> None:
    raw = _raw()
    raw["metrics"][0]["name"] = "daemon_state"
    raw["metrics"][1]["labels"] = {"pid": None}
    path = tmp_path / "metrics.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(mc.CatalogError) as excinfo:
        mc.load(path)
    assert "daemon_state: must start with 'elasticd_'" in str(excinfo.value)
    assert "'pid' is forbidden" in str(excinfo.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw.update(extra=1), "unknown top-level keys"),
        (lambda raw: raw["metrics"][0].update(unit="s"), "unknown keys ['unit']"),
        (lambda raw: raw["metrics"][0].update(type="summary"), "must be one of"),
        (lambda raw: raw["metrics"][0].update(help=None), "'help' must be a string"),
        (lambda raw: raw.update(metrics=[]), "non-empty list"),
    ],
)
def test_parse_rejects_malformed_documents(mutate: Any, message: str) -> None:
    raw = copy.deepcopy(_raw())
    mutate(raw)
    with pytest.raises(mc.CatalogError, match=message.replace("[", r"\[").replace("]", r"\]")):
        mc.parse(raw)


# --- PromQL references -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        'max by (run_id) (elasticd_daemon_state{state="diverged"}) == 1',
        "histogram_quantile(0.95, sum by (le) (rate(elasticd_train_step_duration_seconds_bucket"
        '{run_id=~".*", le!="+Inf"}[5m])))',
        'sum(increase(elasticd_worker_restarts_total{reason=~"crash|hang"}[15m])) by (run_id)',
        "time() - elasticd_train_last_step_timestamp_seconds > 1e3 offset 5m",
        'label_replace(elasticd_guard_rewinds_total, "kind", "rewind", "", "") > Inf',
    ],
)
def test_expression_check_accepts_catalog_queries(catalog: mc.Catalog, expr: str) -> None:
    assert mc.expression_problems(expr, catalog) == []


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(elasticd_train_los[1m])", "unknown metric 'elasticd_train_los'"),
        ("elastcd_train_step > 0", "unknown metric 'elastcd_train_step'"),
        ('elasticd_train_loss{run_id="a"} / elasticd_train_steps', "unknown metric"),
        ("elasticd_train_step_duration_seconds > 1", "unknown metric"),
        ("rat(elasticd_train_step[1m])", "unknown function 'rat'"),
        ('elasticd_daemon_state{stat="running"}', "has no label 'stat'"),
        ('elasticd_daemon_state{state="divergd"}', "has no value ['divergd']"),
        ('elasticd_worker_restarts_total{reason=~"crash|oom"}', "has no value ['oom']"),
        ('elasticd_train_loss{le="1"}', "has no label 'le'"),
    ],
)
def test_expression_check_catches_misspellings(
    catalog: mc.Catalog, expr: str, problem: str
) -> None:
    problems = mc.expression_problems(expr, catalog)
    assert any(problem in p for p in problems), problems


def test_substitute_variables_fills_grafana_builtins_and_selections() -> None:
    expr = 'rate(x{run_id=~"$run_id", node=~"${node}"}[$__rate_interval])'
    assert mc.substitute_variables(expr) == 'rate(x{run_id=~".*", node=~".*"}[1m])'
    assert 'run_id=~"r1"' in mc.substitute_variables(expr, {"run_id": "r1"})


# --- exposition ----------------------------------------------------------------------------------


def test_a_registry_built_from_the_catalog_matches_it(catalog: mc.Catalog) -> None:
    registry, _ = catalog_registry(catalog)
    text = generate_latest(registry).decode()
    assert mc.exposition_problems(text, catalog, require_all=True) == []


def test_exposition_check_reports_drift(catalog: mc.Catalog) -> None:
    registry = CollectorRegistry()
    # Wrong help text, a label too many, an unknown metric, a wrong type, an unlisted value.
    Gauge("elasticd_train_loss", "Loss.", ["run_id", "node"], registry=registry).labels("r", "n")
    Gauge("elasticd_etcd_up", catalog.get("elasticd_etcd_up").help, ["run_id", "node", "pid"],
          registry=registry).labels("r", "n", "1")  # fmt: skip
    Gauge("elasticd_train_tokens", "Tokens.", ["run_id", "node"], registry=registry)
    Counter("elasticd_train_step", catalog.get("elasticd_train_step").help, registry=registry)
    step_seconds = catalog.get("elasticd_train_step_duration_seconds")
    Histogram(step_seconds.name, step_seconds.help, ["run_id", "node"], buckets=[1, 2],
              registry=registry).labels("r", "n")  # fmt: skip
    restarts = catalog.get("elasticd_worker_restarts_total")
    Counter(restarts.name, restarts.help, ["run_id", "node", "reason"], registry=registry).labels(
        "r", "n", "oom"
    )
    problems = mc.exposition_problems(generate_latest(registry).decode(), catalog, require_all=True)
    text = "\n".join(problems)
    assert "elasticd_train_loss: help 'Loss.'" in text
    assert "elasticd_etcd_up: labels ['node', 'pid', 'run_id']" in text
    assert "elasticd_train_tokens: not in the catalog" in text
    assert "elasticd_train_step: type counter, catalog says gauge" in text
    assert "reason='oom' not listed" in text
    assert "elasticd_guard_state: not exposed" in text
    assert "elasticd_train_step_duration_seconds: buckets [1.0, 2.0], catalog says" in text
    lenient = mc.exposition_problems(generate_latest(registry).decode(), catalog, check_help=False)
    assert not any("help" in p for p in lenient)
    assert len(lenient) == len([p for p in problems if "help" not in p and "not exposed" not in p])


# --- documentation -------------------------------------------------------------------------------


def test_docs_metrics_md_holds_the_current_table(catalog: mc.Catalog) -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert mc.markdown_table(catalog) in doc, (
        "docs/metrics.md is out of date: paste ops.metrics_catalog.markdown_table(load())"
    )
