"""elasticctl against a real two-node run over a real etcd (issue 6)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.daemons import (
    daemons,
    merged_steps,
    start_daemon,
    tiny_job,
    wait_step,
    wait_world_size,
)
from tests.support.etcd import EtcdServer, etcd_server
from tests.support.procs import elasticctl, wait_for

__all__ = ["etcd_server"]
pytestmark = pytest.mark.slow


def ctl(endpoint: str, run_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    # Longer than any --timeout below: a --wait that times out says so itself.
    return elasticctl("--etcd", endpoint, "--run-id", run_id, *args, timeout_seconds=180)


def test_elasticctl_reads_and_steers_a_running_group(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    ep, run = etcd_server.endpoint, "ctl"
    doc = tiny_job(
        tmp_path,
        demo_corpus,
        endpoint=ep,
        run_id=run,
        nodes={"min": 1, "max": 2},
        # Nothing is deleted while elasticctl lists and verifies the checkpoints.
        checkpoint={"keep_last": 1000},
        train={"steps": 100000},
    )
    with daemons() as group:
        group += [start_daemon(doc, name=n, log_dir=tmp_path) for n in ("a", "b")]
        wait_world_size(group, 2, timeout_seconds=240)
        wait_step(group, 25, timeout_seconds=120)

        status = ctl(ep, run, "status", "--json")
        assert status.returncode == 0, status.stderr
        body = json.loads(status.stdout)
        assert body["state"] == "running" and body["world_size"] == 2
        assert "state" in ctl(ep, run, "status").stdout  # the readable table
        # Rank 0 refreshes the run status at most every 30 s: the step line's numbers follow.
        train = wait_for(
            lambda: json.loads(ctl(ep, run, "status", "--json").stdout).get("train"),
            timeout_seconds=90,
            what="the step line's numbers in the run status",
        )
        assert isinstance(train["loss"], float) and train["step"] >= 1

        events = json.loads(ctl(ep, run, "events", "--json").stdout)
        assert any(e["event"] == "state" and e["state"] == "running" for e in events)

        ckpts = ctl(ep, run, "checkpoints", "--verify", "--json")
        assert ckpts.returncode == 0, ckpts.stderr
        listed = json.loads(ckpts.stdout)
        assert listed and all(c["problems"] == [] for c in listed)
        assert any(c["known_good"] for c in listed)
        target = max(c["step"] for c in listed if c["known_good"])

        # --wait returns once the group says it applied the request (the event log / round).
        paused = ctl(ep, run, "pause", "--wait", "--timeout", "60")
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.startswith("pause applied: paused at step")
        wait_for(  # the relay writes the daemon's log and the event log independently
            lambda: [r for d in group for r in d.events("paused")],
            timeout_seconds=30,
            what="paused in the daemons' logs",
        )
        held = max(r["step"] for r in merged_steps(*group))
        time.sleep(3)  # a pause must hold: no step may complete in this window
        assert max(r["step"] for r in merged_steps(*group)) == held
        resumed = ctl(ep, run, "resume", "--wait", "--timeout", "60")
        assert resumed.returncode == 0, resumed.stderr
        wait_step(group, held + 3, timeout_seconds=60)

        rewound = ctl(ep, run, "rewind", "--to-step", str(target), "--wait", "--timeout", "90")
        assert rewound.returncode == 0, rewound.stderr
        assert f"rewound to step {target}" in rewound.stdout
        rewind = wait_for(
            lambda: [r for d in group for r in d.events("rewind")],
            timeout_seconds=30,
            what="rewind in the daemons' logs",
        )[0]
        assert rewind["to_step"] == target

        scaled = ctl(ep, run, "scale", "--min", "1", "--max", "1", "--wait", "--timeout", "120")
        assert scaled.returncode == 0, scaled.stderr
        assert "formed with 1 node(s)" in scaled.stdout
        assert json.loads(ctl(ep, run, "status", "--json").stdout)["max_nodes"] == 1

    png = tmp_path / "report.png"
    report = ctl(ep, run, "report", "--log", *[str(d.log) for d in group], "--out", str(png))
    assert report.returncode == 0, report.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[0] >= 400


def test_bad_usage_is_one_line_and_exit_2(etcd_server: EtcdServer) -> None:
    proc = ctl(etcd_server.endpoint, "ctl", "scale", "--min", "3", "--max", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "elasticctl: --min=3 --max=1: need 1 <= min <= max <= 65536"
    ]
