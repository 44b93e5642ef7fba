"""The README's main command: `elasticd run --config examples/tiny.yaml` on the embedded default
(one node, embedded etcd, local checkpoints, demo corpus prepared on first run)."""

from __future__ import annotations

import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import REPO, base_env, events

pytestmark = pytest.mark.slow


def test_quickstart_trains_the_demo_and_the_loss_falls(tmp_path: Path) -> None:
    elasticd = shutil.which("elasticd")
    assert elasticd, "the console script is installed by .ci/install"
    log = tmp_path / "out.log"
    sets = [
        f"run_dir={tmp_path / 'run'}",
        f"checkpoint.url={tmp_path / 'ckpt'}",
        "metrics.port=0",
        "train.steps=150",
    ]
    args = [elasticd, "run", "--config", "examples/tiny.yaml"]
    for item in sets:
        args += ["--set", item]
    with open(log, "wb") as out:
        code = subprocess.run(
            args,
            cwd=REPO,
            env=base_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
            check=False,
        ).returncode
    assert code == 0, log.read_text()[-3000:]
    losses = [r["loss"] for r in events(log, "step")]
    assert len(losses) == 150
    first, last = statistics.mean(losses[:50]), statistics.mean(losses[-50:])
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "run" / "data").exists()  # the demo corpus was prepared on first run
    assert any(r["event"] == "embedded_etcd" for r in events(log, "embedded_etcd"))
