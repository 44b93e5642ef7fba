"""The chart's alert rules and dashboard are generated from ops/ and must not drift."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ops import sync_chart


def test_chart_copies_of_the_alert_rules_and_dashboard_match_ops() -> None:
    stale = [str(p.relative_to(sync_chart.REPO)) for p in sync_chart.stale()]
    assert stale == [], "run: python ops/sync_chart.py"


def test_the_rule_copy_is_the_source_behind_a_generated_header() -> None:
    rules = sync_chart.copies()[0]
    text = rules.target.read_text(encoding="utf-8")
    assert text.startswith("# GENERATED from ops/prometheus/alerts.yaml by ops/sync_chart.py")
    assert yaml.safe_load(text) == yaml.safe_load(rules.source.read_text(encoding="utf-8"))


def _fake_repo(tmp_path: Path) -> Path:
    for source in (c.source for c in sync_chart.copies()):
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
