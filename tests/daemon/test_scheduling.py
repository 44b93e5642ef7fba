"""The daemon's threads run SCHED_BATCH; workers it starts run under the normal policy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SCHED_BATCH is Linux's")

# In a fresh interpreter (the policy is per thread and inherited): the daemon's class is set,
# then a thread and a worker (through the pool's own pre-exec hook) report theirs.
PROBE = textwrap.dedent(
    """
    import json, subprocess, sys, threading
    from daemon import scheduling, workers
    seen = {"before": scheduling.policy_name(), "set": scheduling.as_daemon()}
    seen["daemon"] = scheduling.policy_name()
    thread = threading.Thread(target=lambda: seen.update(thread=scheduling.policy_name()))
    thread.start(); thread.join()
    probe = "from daemon import scheduling; print(scheduling.policy_name())"
    seen["worker"] = subprocess.run(
        [sys.executable, "-c", probe], preexec_fn=workers._in_worker,
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    seen["etcd_like"] = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    print(json.dumps(seen))
    """
)


def test_daemon_threads_and_children_are_batch_and_workers_go_back_to_normal() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {
        "before": "normal",
        "set": True,
        "daemon": "batch",
        "thread": "batch",  # the daemon's threads inherit it
        "worker": "normal",  # a worker trains under the normal policy
        "etcd_like": "batch",  # any other child (the embedded etcd) keeps it
    }
