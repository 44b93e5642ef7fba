"""The standby pool: warm launchers of ``worker.command``, their ready handshake, and what the
daemon keeps of a worker's output (the failure report of ``elasticctl status``)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

from daemon.config import WorkerConfig
from daemon.workers import RoundAssignment, StandbyPool, WorkerGroup, worker_env
from elastic.protocol import Env, is_standby_ready, standby_ready_line
from tests.support.procs import REPO

# Imported by every launcher of these tests at start-up (sitecustomize, from PYTHONPATH): output
# before the ready line, as torch's import-time warnings would print, and an optional delay.
SITECUSTOMIZE = """
import os, time
if "FAKE_STANDBY_DELAY" in os.environ:
    print("a warning printed while importing", flush=True)
    print('{"event": "something_else"}', flush=True)
    time.sleep(float(os.environ["FAKE_STANDBY_DELAY"]))
"""

FAKE_LOOP = """
import json, os, sys
print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}), flush=True)
print("epoch 1 loss 2.5", flush=True)
print("Traceback (most recent call last):", file=sys.stderr, flush=True)
print("RuntimeError: out of ideas", file=sys.stderr, flush=True)
sys.exit(1)
"""


def _run_one(
    tmp_path: Path, worker: WorkerConfig, *, delay: str | None
) -> tuple[WorkerGroup, list[str]]:
    """One cold worker of ``worker`` through the real launcher, run to its end; its relayed
    lines."""
    pool = _pool(tmp_path, delay=delay, size=0, worker=worker)
    assignment = RoundAssignment(0, 0, 1, 1, "127.0.0.1", 29500, 0)
    env = worker_env(
        _base_env(tmp_path, delay),
        assignment,
        local_rank=0,
        run_id="r",
        node="node-a",
        worker_dir=tmp_path / "round",
        config_path=str(tmp_path / "config.resolved.yaml"),
        extra=worker.env,
    )
    out = io.StringIO()
    group = WorkerGroup(pool=pool, envs=[env], node="node-a", out=out)
    try:
        assert group.wait(120)
    finally:
        group.stop()
        pool.close()
    return group, out.getvalue().splitlines()


def _base_env(tmp_path: Path, delay: str | None) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    if delay is not None:
        env["FAKE_STANDBY_DELAY"] = delay
    return env


def _pool(tmp_path: Path, *, delay: str | None, size: int, worker: WorkerConfig) -> StandbyPool:
    return StandbyPool(
        worker=worker,
        config_path=str(tmp_path / "config.resolved.yaml"),
        base_env=_base_env(tmp_path, delay),
        size=size,
    )


def test_ready_line_round_trips() -> None:
    assert is_standby_ready(standby_ready_line(1.25).encode() + b"\n")
    assert not is_standby_ready(b'{"event": "step"}\n')
    assert not is_standby_ready(b"Traceback (most recent call last):\n")
    assert not is_standby_ready(b"[1, 2]\n")


def test_wait_ready_sees_the_ready_line_after_other_output(tmp_path: Path) -> None:
    pool = _pool(tmp_path, delay="0", size=2, worker=WorkerConfig())
    try:
        pool.fill()
        assert pool.wait_ready(2, timeout_seconds=60)
        proc, warm = pool.take()
        assert warm and proc.poll() is None  # warm and still waiting for its env
        config = str(tmp_path / "config.resolved.yaml")
        assert proc.args == [
            sys.executable,
            *("-P", "-m", "elastic.worker.standby", "--"),
            *(sys.executable, "-P", "-m", "model.train", "--config", config),
        ]
    finally:
        pool.close()


def test_wait_ready_gives_up_at_the_deadline(tmp_path: Path) -> None:
    pool = _pool(tmp_path, delay="60", size=1, worker=WorkerConfig())
    try:
        pool.fill()
        assert not pool.wait_ready(1, timeout_seconds=0.5)
    finally:
        pool.close()


def test_a_failed_worker_leaves_its_command_exit_code_and_last_plain_lines(
    tmp_path: Path,
) -> None:
    (tmp_path / "loop.py").write_text(FAKE_LOOP)
    names = [Env.NODE.value, Env.CONFIG.value, "MY_SETTING", "RANK"]
    worker = WorkerConfig(
        command=("{python}", "loop.py", *names),
        env={"MY_SETTING": "on", "RANK": "99"},  # RANK is the contract's: it wins
        cwd=str(tmp_path),
    )
    group, relayed = _run_one(tmp_path, worker, delay=None)
    [exit_] = group.poll()
    failure = group.failure(exit_)
    assert failure["command"] == [sys.executable, "loop.py", *names]
    assert (failure["local_rank"], failure["returncode"]) == (0, 1)
    assert failure["output_tail"][-3:] == [
        "epoch 1 loss 2.5",
        "Traceback (most recent call last):",
        "RuntimeError: out of ideas",
    ]
    seen = json.loads(next(line for line in relayed if "MY_SETTING" in line))
    assert {k: seen[k] for k in names} == {
        Env.NODE.value: "node-a",
        Env.CONFIG.value: str(tmp_path / "config.resolved.yaml"),
        "MY_SETTING": "on",
        "RANK": "0",
    }
    assert group.last_output(0) is not None
    silent = group.silent_seconds(time.monotonic())
    assert silent is not None and silent >= 0


def test_what_the_launcher_prints_while_importing_is_kept_but_is_no_sign_of_the_loop(
    tmp_path: Path,
) -> None:
    (tmp_path / "quiet.py").write_text("")
    worker = WorkerConfig(command=("{python}", "quiet.py"), cwd=str(tmp_path))
    group, _ = _run_one(tmp_path, worker, delay="0")
    assert group.poll()[0].returncode == 0
    assert group.tail(0) == ["a warning printed while importing"]
    assert group.last_output(0) is None and group.silent_seconds(time.monotonic()) is None
