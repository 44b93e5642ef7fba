"""ops/grafana/elasticd.json: structure, variables, required panels, catalog names, filters."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from ops import metrics_catalog as mc

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
