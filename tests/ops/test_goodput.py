"""Run-level goodput for ``elasticctl status`` and ``elasticctl report`` (ops/goodput.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops import goodput
from ops.report import read_history

NODE_A = {
    "wall_seconds": 100.0,
    "productive_seconds": 80.0,
    "ratio": 0.8,
    "badput_seconds": {"recompute": 15.0, "paused": 5.0, "other": 0.0},
}
NODE_B = {
    "wall_seconds": 50.0,
    "productive_seconds": 20.0,
    "ratio": 0.4,
    "badput_seconds": {"recompute": 10.0, "startup": 20.0},
}


def test_the_run_figure_is_the_wall_time_weighted_mean_over_nodes() -> None:
    run = goodput.combine([NODE_A, NODE_B])
    assert run is not None
    assert run["ratio"] == pytest.approx(100 / 150, abs=1e-4)
    assert run["wall_seconds"] == 150.0
    assert run["badput_seconds"] == {
        "recompute": 25.0,
        "paused": 5.0,
        "other": 0.0,
        "startup": 20.0,
    }


def test_no_ledgers_no_figure() -> None:
    assert goodput.combine([]) is None
    assert goodput.lines({}) == []


def test_members_without_a_ledger_are_left_out() -> None:
    members = {"b": {"state": "running"}, "a": {"goodput": NODE_A}, "c": "not a mapping"}
    assert goodput.member_ledgers(members) == {"a": NODE_A}


def test_status_lines_name_the_run_figure_then_each_node_largest_badput_first() -> None:
    text = goodput.lines({"b": NODE_B, "a": NODE_A})
    assert text[0].startswith("goodput 66.7% of 150.0 s (productive 100.0 s; badput: recompute")
    assert (
        text[1]
        == "  a: 80.0% of 100.0 s (productive 80.0 s; badput: recompute 15.0 s, paused 5.0 s)"
    )
    assert text[2].startswith("  b: 40.0% of 50.0 s")


def test_report_keeps_each_nodes_newest_goodput_line(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    rows = [
        {"event": "goodput", "node": "a", "ts": 2.0, **NODE_A},
        {"event": "goodput", "node": "a", "ts": 1.0, **NODE_B},  # older: replaced
        {"event": "step", "step": 1, "ts": 1.5, "loss": 1.0, "grad_norm": 1.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    history = read_history([str(log)])
    assert history.goodput["a"]["ratio"] == 0.8


def test_a_published_ledger_is_advanced_to_now_with_its_rates() -> None:
    published = {**NODE_A, "as_of_unix": 1000.0, "rates": {"paused": 1.0}}
    now = goodput.advance(published, 1010.0)
    assert now["wall_seconds"] == 110.0 and now["productive_seconds"] == 80.0
    assert now["badput_seconds"]["paused"] == 15.0 and now["ratio"] == round(80 / 110, 4)
    training = goodput.advance({**published, "rates": {"productive": 0.5, "degraded": 0.5}}, 1010)
    assert training["productive_seconds"] == 85.0 and training["badput_seconds"]["degraded"] == 5.0
    assert goodput.advance(published, 990.0)["wall_seconds"] == 100.0  # clock skew: never back
    assert goodput.advance(NODE_A, 2000.0) == NODE_A  # no stamp (an older daemon): as it is
    stopped = {**published, "rates": {}}
    assert goodput.member_ledgers({"a": {"goodput": stopped}}, now_unix=2000.0)["a"] == stopped
