"""ops/grafana/elasticd.json: structure, variables, required panels, catalog names, filters."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from daemon.metrics import NodeMetrics
from ops import metrics_catalog as mc
from tests.support.prometheus import MetricsEndpoint, PrometheusServer, prometheus_binary

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Panel title -> metrics its queries must use (the operator questions each panel answers).
REQUIRED_PANELS = {
    "Loss": {"elasticd_train_loss"},
    "Grad norm": {"elasticd_train_grad_norm"},
    "Learning rate": {"elasticd_train_learning_rate"},
    "Tokens/s": {"elasticd_train_tokens_per_second"},
    "Step duration p50 / p95": {"elasticd_train_step_duration_seconds_bucket"},
    "Eval loss by source": {"elasticd_eval_loss"},
    "World size and nodes": {
        "elasticd_group_world_size",
        "elasticd_group_nodes",
        "elasticd_group_min_nodes",
        "elasticd_group_max_nodes",
    },
    "Worker restarts by reason": {"elasticd_worker_restarts_total"},
    "Checkpoint age": {"elasticd_checkpoint_last_commit_timestamp_seconds"},
    "Committed and known-good step": {
        "elasticd_checkpoint_last_committed_step",
        "elasticd_checkpoint_last_known_good_step",
    },
    "Divergence events by kind": {"elasticd_guard_divergence_events_total"},
    "Skipped steps and rewinds": {
        "elasticd_guard_skipped_steps_total",
        "elasticd_guard_rewinds_total",
    },
    "Guard state": {"elasticd_guard_state"},
    "Daemon state": {"elasticd_daemon_state"},
    "etcd up": {"elasticd_etcd_up"},
    "Step compute time by node": {"elasticd_node_step_compute_seconds"},
    "Straggler ratio by node": {"elasticd_node_straggler_ratio", "elasticd_node_straggler"},
    "MFU": {"elasticd_train_mfu_ratio"},
    "Progress": {"elasticd_train_step", "elasticd_train_total_steps"},
    "Tokens in the time range": {"elasticd_train_tokens_total"},
    "Worker peak memory by node": {"elasticd_worker_peak_memory_bytes"},
    "Build": {"elasticd_build_info"},
}
# State panel -> (metric, the colour each of its states must show).
STATE_COLOURS = {
    "Daemon state": (
        "elasticd_daemon_state",
        {
            "failed": "red",
            "diverged": "red",
            "starting": "orange",
            "joining": "orange",
            "waiting": "orange",
            "draining": "orange",
            "running": "green",
            "stopped": "green",
        },
    ),
    "Guard state": (
        "elasticd_guard_state",
        {"diverged": "red", "watching": "orange", "rewinding": "orange", "ok": "green"},
    ),
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(mc.DASHBOARD_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def catalog() -> mc.Catalog:
    return mc.load()


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    return next(p for p in _panels(dashboard) if p["title"] == title)


def _variable(dashboard: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in dashboard["templating"]["list"] if v["name"] == name)


def _catalog_problems(dashboard: dict[str, Any], catalog: mc.Catalog) -> dict[str, list[str]]:
    problems = {
        q.where: mc.expression_problems(mc.substitute_variables(q.expr), catalog)
        for q in mc.dashboard_queries(dashboard)
    }
    return {where: found for where, found in problems.items() if found}


def _filter_problems(dashboard: dict[str, Any]) -> list[str]:
    """Selectors in panels and annotations that do not filter by the run_id and node variables."""
    wanted = {mc.Matcher("run_id", "=~", "$run_id"), mc.Matcher("node", "=~", "$node")}
    return [
        f"{q.where}: {s.metric}"
        for q in mc.dashboard_queries(dashboard)
        if not q.where.startswith("variable")
        for s in mc.selectors(q.expr)
        if not wanted <= set(s.matchers)
    ]


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "elasticd"
    assert dashboard["title"] == "elasticd"
    assert 36 <= dashboard["schemaVersion"] <= 41


def test_datasource_run_id_and_node_variables_exist(dashboard: dict[str, Any]) -> None:
    datasource = _variable(dashboard, "datasource")
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    run_id = _variable(dashboard, "run_id")
    node = _variable(dashboard, "node")
    for variable in (run_id, node):
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE
        assert variable["includeAll"] and variable["multi"]
    assert run_id["query"]["query"] == "label_values(elasticd_daemon_state, run_id)"
    assert node["query"]["query"] == 'label_values(elasticd_daemon_state{run_id=~"$run_id"}, node)'


@pytest.mark.parametrize("title", sorted(REQUIRED_PANELS))
def test_required_panel_exists_and_queries_its_metrics(
    dashboard: dict[str, Any], title: str
) -> None:
    panel = _panel(dashboard, title)
    used = {s.metric for t in panel["targets"] for s in mc.selectors(t["expr"])}
    assert REQUIRED_PANELS[title] <= used


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_loss_panel_shows_rewind_and_restart_annotations(dashboard: dict[str, Any]) -> None:
    loss_id = _panel(dashboard, "Loss")["id"]
    by_name = {a["name"]: a for a in dashboard["annotations"]["list"]}
    for name, metric in (
        ("Rewinds", "elasticd_guard_rewinds_total"),
        ("Worker restarts", "elasticd_worker_restarts_total"),
    ):
        annotation = by_name[name]
        assert annotation["enable"] and annotation["datasource"] == DATASOURCE
        assert {s.metric for s in mc.selectors(annotation["expr"])} == {metric}
        assert loss_id in annotation["filter"]["ids"] and not annotation["filter"]["exclude"]


def test_every_query_uses_only_catalog_metrics(
    dashboard: dict[str, Any], catalog: mc.Catalog
) -> None:
    assert len(mc.dashboard_queries(dashboard)) > len(REQUIRED_PANELS)
    assert _catalog_problems(dashboard, catalog) == {}


def test_the_dashboard_check_catches_a_misspelt_metric(
    dashboard: dict[str, Any], catalog: mc.Catalog
) -> None:
    broken = copy.deepcopy(dashboard)
    target = _panel(broken, "Grad norm")["targets"][0]
    target["expr"] = target["expr"].replace("grad_norm", "gradnorm")
    assert _catalog_problems(broken, catalog) == {
        "panel 'Grad norm' A": ["unknown metric 'elasticd_train_gradnorm'"]
    }


def test_every_panel_and_annotation_filters_by_run_id_and_node(dashboard: dict[str, Any]) -> None:
    assert _filter_problems(dashboard) == []


def test_the_filter_check_catches_a_missing_node_filter(dashboard: dict[str, Any]) -> None:
    broken = copy.deepcopy(dashboard)
    target = _panel(broken, "Tokens/s")["targets"][0]
    target["expr"] = target["expr"].replace(', node=~"$node"', "")
    assert _filter_problems(broken) == ["panel 'Tokens/s' A: elasticd_train_tokens_per_second"]


def threshold_colour(panel: dict[str, Any], value: float) -> str:
    """The colour Grafana gives ``value``: the last threshold step at or below it."""
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    colour = steps[0]["color"]
    for step in steps[1:]:
        if value >= step["value"]:
            colour = step["color"]
    return str(colour)


def _state_values(panel: dict[str, Any], metric: str) -> dict[str, float]:
    """State -> the value the panel's query gives it: each `or` branch selects some states
    (a `state` matcher) and multiplies them by its factor (none: 1)."""
    (target,) = panel["targets"]
    values: dict[str, float] = {}
    for branch in target["expr"].split("\nor\n"):
        (selector,) = [s for s in mc.selectors(branch) if s.metric == metric]
        (matcher,) = [m for m in selector.matchers if m.label == "state"]
        factor = re.search(r"\* (\d+)\s*$", branch)
        for state in matcher.value.split("|"):
            assert state not in values, f"{state} in two branches"
            values[state] = float(factor.group(1)) if factor else 1.0
    return values


@pytest.mark.parametrize("title", sorted(STATE_COLOURS))
def test_state_panels_colour_every_state_and_failed_or_diverged_red(
    dashboard: dict[str, Any], catalog: mc.Catalog, title: str
) -> None:
    metric, expected = STATE_COLOURS[title]
    label = catalog.get(metric).label("state")
    assert label is not None and set(expected) == set(label.values or ())
    panel = _panel(dashboard, title)
    assert panel["options"]["colorMode"] == "background"
    values = _state_values(panel, metric)
    assert {state: threshold_colour(panel, values[state]) for state in expected} == expected


@pytest.mark.skipif(prometheus_binary() is None, reason="prometheus not installed (Debian)")
def test_a_live_prometheus_shows_a_failed_daemon_and_a_diverged_guard_in_red(
    dashboard: dict[str, Any],
) -> None:
    failed = NodeMetrics(run_id="r1", node="n0")
    failed.set_state("failed")
    running = NodeMetrics(run_id="r1", node="n1")
    running.set_state("running")
    running.set_hosts_rank0(True)
    running.on_worker_line({"event": "diverged", "reasons": ["budget"]})
    colours: dict[str, str] = {}
    with (
        MetricsEndpoint(failed.registry) as a,
        MetricsEndpoint(running.registry) as b,
        PrometheusServer([a.target, b.target]) as prom,
    ):
        prom.wait_for('count(elasticd_build_info{run_id="r1"}) == 2', timeout_seconds=30)
        for title in STATE_COLOURS:
            panel = _panel(dashboard, title)
            expr = mc.substitute_variables(panel["targets"][0]["expr"])
            for series in prom.query(expr):
                labels = series["metric"]
                key = f"{title} {labels.get('node', labels['run_id'])} {labels['state']}"
                colours[key] = threshold_colour(panel, float(series["value"][1]))
    assert colours == {
        "Daemon state n0 failed": "red",
        "Daemon state n1 running": "green",
        "Guard state r1 diverged": "red",
    }
