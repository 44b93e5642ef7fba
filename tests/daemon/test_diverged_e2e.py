"""A diverged run is fixed the way docs/runbooks/ElasticdRunDiverged.md says (issue 16):
``elasticctl status`` shows ``diverged``, ``elasticctl rewind --to-step N`` and
``elasticctl resume`` restart training from step N on every node, and the run finishes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support.daemons import daemons, merged_steps, start_daemon, tiny_job
from tests.support.etcd import EtcdServer
from tests.support.procs import elasticctl, wait_for

pytestmark = pytest.mark.slow

FAULTS_ON = {"ELASTICD_ALLOW_FAULTS": "1"}
RESTART_STEP = 10


def test_a_diverged_run_restarts_from_the_operators_step_on_every_node(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    # Two non-finite steps in a row ask for a rewind; with no rewind budget the guard gives up.
    doc = tiny_job(
        tmp_path,
        demo_corpus,
        endpoint=etcd_server.endpoint,
        run_id="fixme",
        nodes={"min": 2, "max": 2},
        train={"steps": 40},
        rewind={"max_rewinds": 0},
        faults=[{"kind": "nan", "step": 24}, {"kind": "nan", "step": 25}],
    )
    ctl = ("--etcd", etcd_server.endpoint, "--run-id", "fixme")
    with daemons() as group:
        group += [start_daemon(doc, name=n, log_dir=tmp_path, env=FAULTS_ON) for n in "ab"]
        for d in group:
            wait_for(
                lambda d=d: "diverged" in d.states(), timeout_seconds=240, what=f"{d.name} diverged"
            )
        # Runbook, what to check: status says diverged.
        status = elasticctl(*ctl, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["state"] == "diverged"
        assert all(d.proc.poll() is None for d in group)  # daemons stay up, workers stopped
        diverged_at = max(r["step"] for r in merged_steps(*group))
        # Runbook, what to do: rewind to a committed step, then resume.
        rewind = elasticctl(*ctl, "rewind", "--to-step", str(RESTART_STEP))
        assert rewind.returncode == 0, rewind.stderr
        resume = elasticctl(*ctl, "resume")
        assert resume.returncode == 0, resume.stderr
        for d in group:
            assert d.wait(timeout_seconds=300) == 0
    rows = merged_steps(*group)
    steps = [int(r["step"]) for r in rows]
    restart_at = steps.index(RESTART_STEP + 1, steps.index(diverged_at))
    # The first life ran to the divergence; the second starts right after step N, once.
    assert steps[:restart_at] == list(range(1, diverged_at + 1))
    assert steps[restart_at:] == list(range(RESTART_STEP + 1, 41))
    second = rows[restart_at:]
    assert all(r["world_size"] == 2 for r in second)
    assert all(math.isfinite(r["loss"]) for r in second)  # the drills do not fire again
    restarts = [r for d in group for r in d.events("operator_restart")]
    assert sorted(r["node"] for r in restarts) == ["a", "b"]
    assert all(r["to_step"] == RESTART_STEP for r in restarts)
    # The run's ledger tells the story: diverged, then the operator's restart from N.
    ledger = json.loads((tmp_path / "ckpt" / "fixme" / "ledger.json").read_text())
    kinds = [(e["event"], e.get("step")) for e in ledger["events"]]
    assert kinds.index(("restart", RESTART_STEP)) > [k for k, _ in kinds].index("diverged")
    status = elasticctl(*ctl, "status", "--json")
    assert json.loads(status.stdout)["state"] == "done"
