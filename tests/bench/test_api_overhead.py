"""bench/api_overhead.py's arithmetic: per-setting medians, per-group ratios, the target."""

from __future__ import annotations

from typing import Any

import pytest

from bench.api_overhead import (
    ORDER,
    Estimate,
    Parts,
    block_table,
    composed,
    estimate,
    met,
    parts,
    section,
)


def blocks(groups: list[dict[str, list[float]]]) -> list[dict[str, Any]]:
    """ABBA blocks from per-group step times: ``{"bare": [first block, second block], ...}``."""
    out = []
    for index, group in enumerate(groups):
        seen = {"bare": 0, "api": 0}
        for setting in ORDER:
            times = group[setting][seen[setting]]
            seen[setting] += 1
            out.append(
                {
                    "group": index,
                    "setting": setting,
                    "step_seconds": times,
                    "cpu_seconds": [t / 2 for t in times],
                    "report_seconds": [0.002 if setting == "api" else 0.001 for _ in times],
                    "boundary_seconds": [0.0005 if setting == "api" else 0.0 for _ in times],
                }
            )
    return out


def test_estimate_compares_medians_of_all_steps_and_of_each_group() -> None:
    made = blocks(
        [
            {"bare": [[0.30, 0.30], [0.30, 0.31]], "api": [[0.303, 0.303], [0.303, 0.9]]},
            {"bare": [[0.40, 0.40], [0.40, 0.40]], "api": [[0.40, 0.40], [0.40, 0.40]]},
        ]
    )
    result = estimate(made)
    assert result.bare_ms == pytest.approx(355.0)  # (0.31 + 0.40) / 2
    assert result.api_ms == pytest.approx(400.0)
    assert result.group_ratios == pytest.approx([0.30 / 0.303, 1.0])
    assert estimate(made, "cpu_seconds").api_ms == pytest.approx(200.0)


def test_the_api_cost_is_its_boundary_plus_its_report_beyond_the_bare_report() -> None:
    made = blocks([{"bare": [[0.3], [0.3]], "api": [[0.3], [0.3]]}] * 3)
    cost = parts(made)
    assert (cost.boundary_ms, cost.api_report_ms, cost.bare_report_ms) == pytest.approx(
        (0.5, 2.0, 1.0)
    )
    assert cost.cost_ms == pytest.approx(1.5)


def test_composed_figure_adds_the_api_cost_to_the_bare_step() -> None:
    cost = Parts(boundary_ms=0.5, api_report_ms=1.5, bare_report_ms=1.0)
    assert composed(cost, bare_ms=99.0) == pytest.approx(0.99)


def test_target_needs_the_composed_figure_and_direct_groups_that_allow_it() -> None:
    noisy = Estimate(bare_ms=300.0, api_ms=310.0, group_ratios=[0.95, 0.98, 1.0, 1.02])
    assert met(noisy, 0.999)  # the direct median is off by noise; the interval allows 0.99
    assert not met(noisy, 0.98)
    slow_groups = Estimate(bare_ms=300.0, api_ms=300.0, group_ratios=[0.95, 0.96, 0.97])
    assert not met(slow_groups, 0.999)


def test_section_reports_ratio_syncs_and_one_table_row_per_group() -> None:
    made = blocks([{"bare": [[0.3], [0.3]], "api": [[0.3], [0.3]]}] * 3)
    syncs = {"report": {"tolist": 1}, "api_step": {"tolist": 1, "item": 4}, "bare_step": {}}
    measured = {"blocks": made, "syncs": syncs, "flagged_steps": []}
    result = section(measured, groups=3, block=1)
    assert result.targets[0].met
    assert "**1.0000x**" in result.body
    assert "`run.report()` **1** (tolist 1)" in result.body
    assert "a whole bare step **0**" in result.body
    assert "CPU time per step" in result.body
    assert "**1.50 ms** a step against the bare step of 300 ms: composed **0.9950x**" in result.body
    assert block_table(made).count("\n") == 2 + 3 - 1  # head, rule, one row per group
