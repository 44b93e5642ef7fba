"""The chart's alert rules and dashboard are generated from ops/ and must not drift."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ops import sync_chart


def test_chart_copies_of_the_alert_rules_and_dashboard_match_ops() -> None:
    stale = [str(p.relative_to(sync_chart.REPO)) for p in sync_chart.stale()]
    assert stale == [], "run: python ops/sync_chart.py"


def test_the_rule_copy_is_the_source_behind_a_generated_header_with_placeholders() -> None:
    rules = sync_chart.copies()[0]
    text = rules.target.read_text(encoding="utf-8")
    assert text.startswith("# GENERATED from ops/prometheus/alerts.yaml by ops/sync_chart.py")
    source = rules.source.read_text(encoding="utf-8")
    assert "__ElasticdTrainingStalled_stalledSeconds__" not in source
    stalled = "elasticd_train_last_step_timestamp_seconds) > "
    assert stalled + "__ElasticdTrainingStalled_stalledSeconds__\n" in text
    assert stalled + "600\n" in source and stalled + "600" not in text
    # Everything but the listed numbers is the source's (tests/helm/test_alerts.py fills them
    # back in and compares the whole file).
    assert len(text.splitlines()) == len(source.splitlines()) + 1


def _thresholds_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "thresholds.yaml"
    path.write_text(text, encoding="utf-8")
    return path


RULES = """groups:
  - name: g
    rules:
      - alert: A
        expr: x > 5
        annotations:
          description: more than 5
      - alert: B
        expr: y > 5
"""


def test_placeholders_go_only_into_the_named_alerts_rule(tmp_path: Path) -> None:
    spec = 'A:\n  limit: {default: 5, text: ["> @", "than @"]}\n'
    thresholds = sync_chart.load_thresholds(_thresholds_file(tmp_path, spec))
    text = sync_chart.with_placeholders(RULES, thresholds)
    assert "expr: x > __A_limit__\n" in text and "more than __A_limit__\n" in text
    assert "expr: y > 5\n" in text  # alert B keeps its number


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ('A:\n  limit: {default: 6, text: ["> @"]}\n', "'> 6' occurs 0 times"),
        ('A:\n  limit: {default: 5, text: ["@"]}\n', "'5' occurs 2 times"),
        ('C:\n  limit: {default: 5, text: ["> @"]}\n', "alert C is not in the rule file"),
        ('A:\n  limit: {default: "5", text: ["> @"]}\n', "not a number"),
        ('A:\n  limit: {default: 5, text: ["> 5"]}\n', "strings with @"),
    ],
)
def test_a_threshold_snippet_not_found_exactly_once_stops_the_generation(
    tmp_path: Path, spec: str, complaint: str
) -> None:
    with pytest.raises(sync_chart.SyncError, match=complaint):
        path = _thresholds_file(tmp_path, spec)
        sync_chart.with_placeholders(RULES, sync_chart.load_thresholds(path))


def _fake_repo(tmp_path: Path) -> Path:
    for source in (s for c in sync_chart.copies() for s in c.sources):
        target = tmp_path / source.relative_to(sync_chart.REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return tmp_path


def test_an_edited_source_makes_its_copy_stale_until_synced(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    assert len(sync_chart.stale(repo)) == 2  # nothing generated yet
    for item in sync_chart.copies(repo):
        item.write()
    assert sync_chart.stale(repo) == []
    dashboard = repo / "ops" / "grafana" / "elasticd.json"
    dashboard.write_text(dashboard.read_text(encoding="utf-8").replace("elasticd", "x", 1))
    assert sync_chart.stale(repo) == [repo / "helm" / "elasticd" / "files" / "elasticd.json"]


def test_check_mode_exits_non_zero_on_drift_and_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _fake_repo(tmp_path)
    assert sync_chart.main(["--check"], repo=repo) == 1
    assert "stale: helm/elasticd/files/alerts.yaml" in capsys.readouterr().out
    assert sync_chart.main([], repo=repo) == 0
    assert sync_chart.main(["--check"], repo=repo) == 0
