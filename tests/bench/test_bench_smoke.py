"""`python -m bench --quick` runs a cheap benchmark and renders a results table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import REPO, base_env

pytestmark = pytest.mark.slow


def test_quick_checkpoint_bench_writes_a_targets_table(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "gpu",
            "checkpoints",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "| benchmark | target | goal | measured | met |" in text
    assert "| checkpoints | save throughput |" in text
    assert "The benchmark failed" not in text


def test_quick_api_overhead_bench_reports_its_target(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "api_overhead", "--out", str(out)],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "| api_overhead | worker API per-step cost |" in text
    assert "`run.report()` **1** (tolist 1)" in text
    assert "The benchmark failed" not in text


def test_list_names_every_benchmark() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--list"],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert proc.stdout.split() == [
        "gpu",
        "checkpoints",
        "resize",
        "node_loss",
        "api_overhead",
        "recovery",
        "overhead",
        "rendezvous",
        "goodput",
    ]
