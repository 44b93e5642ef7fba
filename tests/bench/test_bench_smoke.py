"""`python -m bench --quick` runs a cheap benchmark and renders a results table."""

from __future__ import annotations

import json
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
    assert "| checkpoints | save throughput (digests on) |" in text
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
        "membership",
        "membership_scale",
        "chaos",
        "goodput",
    ]


def test_membership_scale_bench_at_sixteen_asyncio_participants_reports_round_writes_and_loss(
    tmp_path: Path,
) -> None:
    out = tmp_path / "membership_scale.json"
    args = ["--sizes", "16", "--loss-size", "16", "--loss-ttl", "2", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.membership_scale", *args],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    size = json.loads(out.read_text())["sizes"]["16"]
    assert size["participants"] == 16 and size["writes"] == 16 + 2, size
    # causal: every node receives the closed round after the opener sent its closing CAS (the
    # CAS's reply, closed_at, may be noted after the receipts when the opener's thread waits)
    assert size["last_put_to_close_seconds"] is not None
    close_sent_to_received = size["close_sent_to_all_received_seconds"]
    assert 0 < close_sent_to_received <= size["join_instant_to_all_received_seconds"]
    assert size["loss"]["watchers"] == 15 and size["loss"]["max_minus_ttl_seconds"] >= 0
    assert "| round of 1,024 (last join put" in proc.stdout  # the targets table


def test_membership_bench_at_eight_participants_reports_rounds_writes_loss_and_idle(
    tmp_path: Path,
) -> None:
    out = tmp_path / "membership.json"
    args = ["--sizes", "8", "--loss-size", "8", "--loss-ttl", "2", "--idle-size", "8"]
    args += ["--idle-seconds", "1"]
    args += ["--c10d-sizes", "4", "--legacy-sizes", "4", "--legacy-window", "1", "--procs", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.membership", *args, "--json", str(out)],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    size = data["sizes"]["8"]
    assert size["round1"]["participants"] == 8 and size["round2"]["participants"] == 8
    assert size["round1"]["writes"] == size["round2"]["writes"] == 8 + 2
    assert size["loss"]["survivors"] == 7 and size["loss"]["missed"] == 0
    assert size["idle"]["revisions"] == 0
    assert data["compare"]["c10d"]["4"]["seconds"] > 0
    assert data["compare"]["legacy"]["4"]["round"]["seconds"] > 0
    assert "| round of 1,024 |" in proc.stdout


def test_chaos_bench_with_one_trial_of_worker_kill_and_bit_flip_reports_outcome_and_audit(
    tmp_path: Path,
) -> None:
    out = tmp_path / "chaos.json"
    args = ["--kinds", "worker_kill,bit_flip", "--trials", "1", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", *args, "--work", str(tmp_path / "work")],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,  # ~40 s on 2 cores
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = json.loads(out.read_text())["trials"]
    assert [t["kind"] for t in trials] == ["worker_kill", "bit_flip"]
    for trial in trials:
        assert trial["documented"] is True, trial
        assert trial["bad_loads"] == [] and trial["audit"]["ok"] is True, trial
    assert trials[0]["restarts"] == ["crash"] and trials[0]["recovery_seconds"] > 0
    assert "fell back" in trials[1]["outcome"]
    assert "| every chaos trial as documented | all | 2/2 | True |" in proc.stdout
