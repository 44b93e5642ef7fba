"""The chart's alert values (thresholds, `for`, labels, per-alert enable, runbook base URL):
rendered by the real helm and checked with promtool, defaults held to ops/prometheus/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops import sync_chart
from tests.helm.chart import (
    CHART,
    CI_VALUES,
    RenderError,
    crd_validate,
    find,
    helm,
    render,
    template_args,
)

REPO = sync_chart.REPO
MONITORING = next(p for p in CI_VALUES if p.name == "monitoring-values.yaml")
RULES = REPO / "ops" / "prometheus" / "alerts.yaml"
THRESHOLDS = sync_chart.load_thresholds(RULES.with_name("thresholds.yaml"))
UNIT_TESTS = [REPO / "ops" / "prometheus" / "tests" / f for f in ("alerts_test.yaml",)]
UNIT_TESTS.append(UNIT_TESTS[0].with_name("alerts_timing_test.yaml"))
PR = "monitoring.prometheusRule"
CUSTOM = [
    f"{PR}.alerts.ElasticdTrainingStalled.stalledSeconds=120",
    f"{PR}.alerts.ElasticdTrainingStalled.for=2m",
    f"{PR}.alerts.ElasticdCrashLoop.restarts=1",
    f"{PR}.alerts.ElasticdCheckpointStale.labels.severity=critical",
    f"{PR}.alerts.ElasticdStragglerNode.enabled=false",
    f"{PR}.additionalAlertLabels.team=ml-infra",
    f"{PR}.additionalAlertLabels.severity=info",  # never replaces an alert's own
    f"{PR}.runbookBaseUrl=https://runbooks.example.internal/elasticd/",
]
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'; .ci/install)"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _source() -> dict[str, Any]:
    return dict(yaml.safe_load(RULES.read_text(encoding="utf-8")))


def _rendered(sets: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The PrometheusRule's rule groups as a Prometheus rule file."""
    rule = find(render([MONITORING], sets=tuple(sets)), "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def _alerts(rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"]}


def _values() -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    return dict(values["monitoring"]["prometheusRule"])


def _write(tmp_path: Path, name: str, doc: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def test_the_default_values_are_the_thresholds_and_holds_of_the_ops_rules() -> None:
    alerts = _values()["alerts"]
    source = _alerts(_source())
    assert list(alerts) == list(source)
    for name, rule in source.items():
        assert alerts[name]["enabled"] is True and alerts[name]["labels"] == {}
        assert alerts[name]["for"] == rule["for"], name
    tunable = {(a, k) for a, cfg in alerts.items() for k in cfg} - {
        (a, k) for a in alerts for k in ("enabled", "labels", "for")
    }
    assert tunable == {(t.alert, t.key) for t in THRESHOLDS}
    assert {(t.alert, t.key): t.default for t in THRESHOLDS} == {
        (a, k): alerts[a][k] for a, k in tunable
    }


def test_the_chart_copy_with_the_defaults_filled_in_is_the_ops_rule_file() -> None:
    text = sync_chart.copies()[0].target.read_text(encoding="utf-8")
    for threshold in THRESHOLDS:
        assert threshold.placeholder in text
        text = text.replace(threshold.placeholder, str(threshold.default))
    assert yaml.safe_load(text) == _source()


def test_default_values_render_the_ops_rules_unchanged() -> None:
    assert _rendered() == {"groups": _source()["groups"]}


def test_values_set_thresholds_holds_labels_enable_and_runbook_urls() -> None:
    alerts = _alerts(_rendered(CUSTOM))
    assert "ElasticdStragglerNode" not in alerts and len(alerts) == 7
    stalled = alerts["ElasticdTrainingStalled"]
    assert "elasticd_train_last_step_timestamp_seconds) > 120\n" in stalled["expr"]
    assert stalled["for"] == "2m"
    assert "{{ 120 | humanizeDuration }}" in stalled["annotations"]["description"]
    assert ") > 1," in alerts["ElasticdCrashLoop"]["expr"]
    assert "more than 1)" in alerts["ElasticdCrashLoop"]["annotations"]["description"]
    for name, rule in alerts.items():
        assert rule["labels"]["team"] == "ml-infra"
        expected = "https://runbooks.example.internal/elasticd/" + name + ".md"
        assert rule["annotations"]["runbook_url"] == expected
    source = _alerts(_source())
    assert alerts["ElasticdCheckpointStale"]["labels"]["severity"] == "critical"  # was warning
    assert alerts["ElasticdRunDiverged"]["labels"]["severity"] == "critical"  # not "info"
    assert alerts["ElasticdDivergenceDetected"]["labels"]["severity"] == "warning"
    assert alerts["ElasticdEtcdUnreachable"]["expr"] == source["ElasticdEtcdUnreachable"]["expr"]


def test_disabling_every_alert_of_a_group_leaves_the_group_out() -> None:
    sets = [f"{PR}.alerts.{a}.enabled=false" for a in ("ElasticdDivergenceDetected",)]
    sets.append(f"{PR}.alerts.ElasticdRunDiverged.enabled=false")
    names = [g["name"] for g in _rendered(sets)["groups"]]
    assert names == ["elasticd"]


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        ([f"{PR}.alerts.ElasticdTrainingStalled.stalledSeconds=-5"], "stalledSeconds"),
        ([f"{PR}.alerts.ElasticdCrashLoop.restarts=1.5"], "restarts"),
        ([f"{PR}.alerts.ElasticdNope.enabled=false"], "ElasticdNope"),
        ([f"{PR}.alerts.ElasticdTrainingStalled.for=ten"], "for"),
        ([f"{PR}.runbookBaseUrl=runbooks"], "runbookBaseUrl"),
        ([f"{PR}.additionalAlertLabels.bad-name=x"], "bad-name"),
    ],
)
def test_bad_alert_values_are_refused_naming_the_key(sets: list[str], complaint: str) -> None:
    with pytest.raises(RenderError, match=complaint):
        render([MONITORING], sets=tuple(sets))


def test_a_threshold_set_to_null_is_refused_rather_than_rendered_as_a_placeholder() -> None:
    sets = [f"{PR}.alerts.ElasticdTrainingStalled.stalledSeconds=null"]
    with pytest.raises(
        RenderError, match="ElasticdTrainingStalled': missing property 'stalledSeconds'"
    ):
        render([MONITORING], sets=tuple(sets))
    # Without the schema, the template itself refuses a placeholder left in the rules.
    proc = helm(*template_args([MONITORING], sets=sets), "--skip-schema-validation")
    assert proc.returncode != 0
    assert "no value for the threshold __ElasticdTrainingStalled_stalledSeconds__" in proc.stderr


def test_the_rendered_rule_with_non_default_values_is_a_valid_prometheus_rule() -> None:
    docs = [d for d in render([MONITORING], sets=tuple(CUSTOM)) if d["kind"] == "PrometheusRule"]
    assert [(r["kind"], r["errors"]) for r in crd_validate(docs)] == [("PrometheusRule", [])]


@needs_promtool
def test_promtool_passes_the_ops_unit_tests_on_the_default_rendering(tmp_path: Path) -> None:
    rules = _write(tmp_path, "rendered.yaml", _rendered())
    assert _promtool("check", "rules", str(rules)).returncode == 0
    paths = []
    for source in UNIT_TESTS:
        doc = yaml.safe_load(source.read_text(encoding="utf-8"))
        doc["rule_files"] = [str(rules)]
        paths.append(str(_write(tmp_path, source.name, doc)))
    result = _promtool("test", "rules", *paths)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == 2


def _stall_test(rules: Path) -> dict[str, Any]:
    """A step that never comes while running: with 120 s held 2m, firing at 5m (pending at
    4m); with the defaults (600 s, 10m) nothing fires by 5m."""
    labels = 'run_id="r1", node="n0"'
    return {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f"elasticd_train_last_step_timestamp_seconds{{{labels}}}",
                        "values": "1+0x10",
                    },
                    {
                        "series": f'elasticd_daemon_state{{{labels}, state="running"}}',
                        "values": "1+0x10",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "ElasticdTrainingStalled", "exp_alerts": []},
                    {
                        "eval_time": "5m",
                        "alertname": "ElasticdTrainingStalled",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "run_id": "r1",
                                    "severity": "critical",
                                    "team": "ml-infra",
                                },
                                "exp_annotations": {
                                    "summary": "elasticd run r1: no training step for 4m 59s",
                                    "description": (
                                        "The last training step of run r1 completed 4m 59s ago"
                                        " while its daemons report state running (stall"
                                        " threshold 2m 0s). The hang watchdog should have"
                                        " restarted the workers."
                                    ),
                                    "runbook_url": "https://runbooks.example.internal/elasticd/"
                                    "ElasticdTrainingStalled.md",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }


@needs_promtool
def test_promtool_checks_and_unit_tests_the_rendering_with_non_default_values(
    tmp_path: Path,
) -> None:
    custom = _write(tmp_path, "custom.yaml", _rendered(CUSTOM))
    checked = _promtool("check", "rules", str(custom))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout
    result = _promtool("test", "rules", str(_write(tmp_path, "t.yaml", _stall_test(custom))))
    assert result.returncode == 0, result.stdout + result.stderr
    # The same expectations fail on the default rendering: the values are what made it fire.
    default = _write(tmp_path, "default.yaml", _rendered())
    result = _promtool("test", "rules", str(_write(tmp_path, "d.yaml", _stall_test(default))))
    assert result.returncode != 0
    assert "ElasticdTrainingStalled" in result.stdout + result.stderr
