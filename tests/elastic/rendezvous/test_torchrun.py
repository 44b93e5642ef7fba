"""Plain torchrun with ``--rdzv-backend etcd3``: two agents on loopback run a gloo all_reduce."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.etcd import EtcdServer

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = Path(__file__).with_name("_allreduce.py")
TIMEOUT_SECONDS = 120

pytestmark = pytest.mark.slow


def test_entry_point_is_installed() -> None:
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="torchrun.handlers")}
    assert names.get("etcd3") == "elastic.rendezvous.torchrun:handler_factory", (
        "the etcd3 torchrun handler is not registered; run `pip install -e .`"
    )


def test_backend_registers_when_our_package_is_imported_before_torch() -> None:
    code = (
        "import elastic.rendezvous\n"
        "from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as r\n"
        "print('etcd3' in r._registry)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_two_torchrun_agents_run_an_all_reduce(etcd_server: EtcdServer, run_id: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    rdzv = {
        "--rdzv-backend": "etcd3",
        "--rdzv-endpoint": etcd_server.endpoint,
        "--rdzv-id": run_id,
        "--rdzv-conf": "last_call_timeout=1,join_timeout=90,key_prefix=/torchrun-test",
    }
    launch = {
        "--local-addr": "127.0.0.1",  # loopback only, whatever the host name resolves to
        "--nnodes": "2",
        "--nproc-per-node": "1",
        "--max-restarts": "0",
        "--monitor-interval": "0.2",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *[part for option in {**rdzv, **launch}.items() for part in option],
        str(SCRIPT),
    ]
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_SECONDS)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    lines = [line for out in outputs for line in out.splitlines() if '"all_reduce"' in line]
    assert len(lines) == 2 and all('"sum": 3.0' in line for line in lines), lines
