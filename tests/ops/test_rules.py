"""ops/prometheus/alerts.yaml: promtool, rule metadata, runbooks, catalog names, live eval."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops import metrics_catalog as mc
from tests.support.prometheus import (
    MetricsEndpoint,
    PrometheusQueryError,
    PrometheusServer,
    catalog_registry,
    prometheus_binary,
)

ROOT = Path(__file__).resolve().parents[2]
TESTS_PATH = ROOT / "ops" / "prometheus" / "tests" / "alerts_test.yaml"
TIMING_TESTS_PATH = TESTS_PATH.with_name("alerts_timing_test.yaml")
RUNBOOK_URL = "https://github.com/elasticd/elasticd/blob/main/docs/runbooks/{}.md"
EXPECTED_ALERTS = {
    "ElasticdDivergenceDetected",
    "ElasticdRunDiverged",
    "ElasticdTrainingStalled",
    "ElasticdCheckpointStale",
    "ElasticdCrashLoop",
    "ElasticdBelowMinNodes",
    "ElasticdEtcdUnreachable",
    "ElasticdStragglerNode",
}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'; .ci/install)"
)


def _rules_doc() -> dict[str, Any]:
    return yaml.safe_load(mc.RULES_PATH.read_text(encoding="utf-8"))


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in _rules_doc()["groups"] for rule in group["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_promtool_check_rules_accepts_the_rule_file() -> None:
    result = _promtool("check", "rules", str(mc.RULES_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(TESTS_PATH), str(TIMING_TESTS_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == 2


@needs_promtool
def test_promtool_unit_tests_fail_on_a_wrong_expectation(tmp_path: Path) -> None:
    # Proves the unit tests compare annotations, not just alert names.
    doc = yaml.safe_load(TESTS_PATH.read_text(encoding="utf-8"))
    doc["rule_files"] = [str(mc.RULES_PATH)]
    doc["tests"] = doc["tests"][:1]
    case = doc["tests"][0]["alert_rule_test"][1]
    case["exp_alerts"][0]["exp_annotations"]["summary"] += " (wrong)"
    path = tmp_path / "wrong_test.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = _promtool("test", "rules", str(path))
    assert result.returncode != 0
    assert "(wrong)" in result.stdout + result.stderr


def test_the_rule_file_defines_exactly_the_documented_alerts() -> None:
    names = [rule["alert"] for rule in _alerts()]
    assert sorted(names) == sorted(EXPECTED_ALERTS)


@pytest.mark.parametrize("alert", sorted(EXPECTED_ALERTS))
def test_every_alert_has_for_severity_summary_description_and_runbook(alert: str) -> None:
    rule = next(r for r in _alerts() if r["alert"] == alert)
    assert "for" in rule and re.fullmatch(r"\d+[smh]", str(rule["for"]))
    assert rule["labels"]["severity"] in ("critical", "warning")
    annotations = rule["annotations"]
    assert annotations["summary"].strip() and annotations["description"].strip()
    assert "{{" in annotations["description"], "description should template a value or label"
    assert annotations["runbook_url"] == RUNBOOK_URL.format(alert)


@pytest.mark.parametrize("alert", sorted(EXPECTED_ALERTS))
def test_every_alert_has_a_runbook_file(alert: str) -> None:
    path = ROOT / "docs" / "runbooks" / f"{alert}.md"
    assert path.is_file()
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# {alert}\n")
    assert re.search(r"elasticctl .*status", text)
    assert "elasticctl --etcd $ETCD --run-id $RUN events" in text


def test_divergence_alerts_are_evaluated_every_second() -> None:
    # "within two scrape intervals at a 1 s scrape" must not depend on the global setting.
    group = next(g for g in _rules_doc()["groups"] if g["name"] == "elasticd-divergence")
    assert group["interval"] == "1s"
    assert {r["alert"] for r in group["rules"]} == {
        "ElasticdDivergenceDetected",
        "ElasticdRunDiverged",
    }


def _cases_by_alert() -> dict[str, dict[str, int]]:
    doc = yaml.safe_load(TESTS_PATH.read_text(encoding="utf-8"))
    counts: dict[str, dict[str, int]] = {}
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            kind = "fires" if case.get("exp_alerts") else "quiet"
            entry = counts.setdefault(case["alertname"], {"fires": 0, "quiet": 0})
            entry[kind] += 1
    return counts


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    counts = _cases_by_alert()
    missing = [
        f"{alert}: {kind}"
        for alert in EXPECTED_ALERTS
        for kind in ("fires", "quiet")
        if counts.get(alert, {}).get(kind, 0) == 0
    ]
    assert missing == []
    assert set(counts) == EXPECTED_ALERTS


def test_every_rule_expression_uses_only_catalog_metrics() -> None:
    catalog = mc.load()
    problems = {
        q.where: mc.expression_problems(q.expr, catalog) for q in mc.rule_queries(_rules_doc())
    }
    assert {where: p for where, p in problems.items() if p} == {}
    assert len(problems) == len(EXPECTED_ALERTS)


def test_the_rule_check_catches_a_misspelt_metric() -> None:
    doc = copy.deepcopy(_rules_doc())
    rule = doc["groups"][1]["rules"][0]
    rule["expr"] = rule["expr"].replace(
        "elasticd_train_last_step_timestamp_seconds", "elasticd_train_last_step_timestamp"
    )
    catalog = mc.load()
    problems = [p for q in mc.rule_queries(doc) for p in mc.expression_problems(q.expr, catalog)]
    assert problems == ["unknown metric 'elasticd_train_last_step_timestamp'"]


@pytest.mark.skipif(prometheus_binary() is None, reason="prometheus not installed (Debian)")
def test_a_live_prometheus_scrapes_catalog_metrics_and_evaluates_every_expression() -> None:
    catalog = mc.load()
    registry, metrics = catalog_registry(catalog, run_id="r1", node="n0")
    metrics["elasticd_train_loss"].labels(run_id="r1", node="n0").set(2.5)
    dashboard = json.loads(mc.DASHBOARD_PATH.read_text(encoding="utf-8"))
    queries = mc.rule_queries(_rules_doc()) + mc.dashboard_queries(dashboard)
    with (
        MetricsEndpoint(registry) as endpoint,
        PrometheusServer([endpoint.target], rule_files=[mc.RULES_PATH]) as prom,
    ):
        assert mc.exposition_problems(endpoint.scrape(), catalog, require_all=True) == []
        loss = prom.wait_for('elasticd_train_loss{run_id="r1", node="n0"}', timeout_seconds=30)
        assert loss[0]["value"][1] == "2.5"
        errors = {}
        for query in queries:
            try:
                prom.query(mc.substitute_variables(query.expr))
            except PrometheusQueryError as exc:
                errors[query.where] = str(exc)
        assert errors == {}
        # etcd_up is 0 in the fresh registry: its rule turns that into a pending alert.
        prom.wait_for('ALERTS{alertname="ElasticdEtcdUnreachable", alertstate="pending"}')
        assert [a["labels"]["node"] for a in prom.alerts()] == ["n0"]
        rules = prom.wait_rules_evaluated(timeout_seconds=30)
        assert {r["name"]: r["health"] for r in rules} == dict.fromkeys(EXPECTED_ALERTS, "ok")
        with pytest.raises(PrometheusQueryError, match="parse error"):
            prom.query("rate(elasticd_train_loss[")
