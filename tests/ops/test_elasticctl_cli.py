"""elasticctl as a new user meets it, against a real etcd: no torch for --help and status,
--version on both CLIs, flags after the command, status with progress and ages, status -w,
--wait on control requests, --json everywhere, shell completion."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elastic.rendezvous import EtcdConfig, RunStore, connect
from elastic.rendezvous.records import RoundRecord, encode
from elastic.version import package_version
from tests.support.etcd import EtcdServer, etcd_server
from tests.support.procs import REPO, base_env, elasticctl, wait_for, write_config

__all__ = ["etcd_server"]
WAIT_SECONDS = 30.0
_runs = iter(range(10**6))


@pytest.fixture
def run(etcd_server: EtcdServer) -> Iterator[tuple[list[str], RunStore]]:
    """A fresh run id on the module's etcd: the flags that name it and a store to publish."""
    run_id = f"cli{next(_runs)}"
    client = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        yield ["--etcd", etcd_server.endpoint, "--run-id", run_id], RunStore(client, run_id=run_id)
    finally:
        client.close()


def publish_running(store: RunStore, *, now: float) -> None:
    """What two daemons publish mid-run: the run status (rank 0), node records, a commit."""
    store.put_status(
        {
            "state": "running",
            "round": 3,
            "nodes": ["node-a", "node-b"],
            "min_nodes": 1,
            "max_nodes": 2,
            "world_size": 4,
            "nproc_per_node": 2,
            "last_step": 1200,
            "checkpoint_url": "file:///ckpt",
            "train": {
                "step": 1200,
                "loss": 2.5,
                "tokens_per_s": 81920.0,
                "step_seconds": 0.5,
                "total_steps": 10000,
                "time_unix": now - 12,
            },
        }
    )
    for node in ("node-a", "node-b"):
        record = {"node": node, "state": "active", "last_step": 1200, "restarts": 0}
        store._kv.put(store.keys.node(node), encode(record))
    store.append_event({"event": "checkpoint_commit", "step": 1100, "ts": now - 192})


# ----------------------------------------------------------------- no torch
IMPORTS_PROBE = """
import contextlib
import io
import json
import sys
from ops.cli import main
with contextlib.redirect_stdout(io.StringIO()) as help_text:
    try:
        main(["--help"])
    except SystemExit:
        pass
assert "status" in help_text.getvalue()
after_help = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
code = main([*sys.argv[1:], "status", "--json"])
after_status = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
print(json.dumps([after_help, after_status, code]), file=sys.stderr)
"""


def test_help_and_status_never_import_torch(run: tuple[list[str], RunStore]) -> None:
    flags, store = run
    publish_running(store, now=time.time())
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE, *flags],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    after_help, after_status, code = json.loads(proc.stderr.strip().splitlines()[-1])
    assert code == 0 and json.loads(proc.stdout)["last_step"] == 1200
    assert after_help == [] and after_status == []


def test_both_clis_print_the_installed_version() -> None:
    ctl = elasticctl("--version")
    daemon = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--version"],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (ctl.returncode, ctl.stdout.strip()) == (0, f"elasticctl {package_version()}")
    assert (daemon.returncode, daemon.stdout.strip()) == (0, f"elasticd {package_version()}")


# ----------------------------------------------------------------- status
def test_global_flags_after_the_command_reach_the_run(
    run: tuple[list[str], RunStore], tmp_path: Path, etcd_server: EtcdServer
) -> None:
    store = run[1]
    publish_running(store, now=time.time())
    job = write_config(
        tmp_path / "job.yaml",
        {"run_id": store.keys.run_id, "etcd": {"endpoints": [etcd_server.endpoint]}},
    )
    proc = elasticctl("status", "--config", str(job), "-o", "json")  # the exit-2 case
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["world_size"] == 4


def test_status_shows_progress_eta_loss_throughput_and_checkpoint_age(
    run: tuple[list[str], RunStore],
) -> None:
    flags, store = run
    now = time.time()
    publish_running(store, now=now)
    text = elasticctl(*flags, "status")
    assert text.returncode == 0, text.stderr
    rows = {line.split("  ")[0]: line for line in text.stdout.splitlines()}
    assert "1200 / 10000 (12.0%)" in rows["step"]
    assert "1h 13m (at the newest step's pace)" in rows["eta"]  # 8800 steps x 0.5 s
    assert "2.5 (" in rows["loss"] and "81920 (" in rows["tokens/s"]
    assert "step 1100, 3m 1" in rows["checkpoint"]  # 3m 12s, give or take the test's seconds
    assert "4 (2 nodes x 2)" in rows["world size"]
    assert "node-a" in text.stdout and "True" not in text.stdout

    body = json.loads(elasticctl(*flags, "status", "--json").stdout)
    assert body["eta_seconds"] == 4400.0 and body["train"]["total_steps"] == 10000
    assert body["last_checkpoint"]["step"] == 1100
    assert body["last_checkpoint"]["time_unix"] == pytest.approx(now - 192, abs=1)
    assert sorted(body["members"]) == ["node-a", "node-b"]


def test_status_watch_prints_a_frame_per_interval_and_ends_on_count_or_ctrl_c(
    run: tuple[list[str], RunStore],
) -> None:
    flags, store = run
    waiting_for_status = elasticctl(*flags, "status", "-w", "--interval", "0.1", "--count", "2")
    assert waiting_for_status.returncode == 0  # no status yet is a frame, not an error
    assert waiting_for_status.stdout.count("(yet)") == 2

    publish_running(store, now=time.time())
    frames = elasticctl(*flags, "status", "-w", "--interval", "0.1", "--count", "3", "-o", "json")
    lines = frames.stdout.splitlines()
    assert frames.returncode == 0 and len(lines) == 3
    assert all(json.loads(line)["last_step"] == 1200 for line in lines)

    watch = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *flags, "status", "-w", "--json", "--interval", "0.2"],
        cwd=REPO,
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        first = watch.stdout.readline()  # bounded: the process prints within its first second
        assert json.loads(first)["state"] == "running"
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=WAIT_SECONDS) == 0
    finally:
        watch.kill()
        watch.wait()


# ----------------------------------------------------------------- --wait
def answer(store: RunStore, condition: Any, event: dict[str, Any]) -> threading.Thread:
    """Play the group: once the control document satisfies ``condition``, publish ``event``."""

    def play() -> None:
        wait_for(lambda: condition(store.get_control()), timeout_seconds=WAIT_SECONDS, what="req")
        store.append_event({"node": "node-a", **event})

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    return thread


def test_pause_and_resume_wait_until_the_group_reports_it(
    run: tuple[list[str], RunStore],
) -> None:
    flags, store = run
    player = answer(store, lambda c: c.get("paused") is True, {"event": "paused", "step": 41})
    paused = elasticctl(*flags, "pause", "--wait", "--timeout", str(WAIT_SECONDS))
    player.join()
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.startswith("pause applied: paused at step 41 (")

    late = elasticctl(*flags, "resume", "--wait", "--timeout", "1", "-o", "json")
    assert late.returncode == 1
    assert late.stderr.strip().splitlines() == [
        "elasticctl: resume: not applied within 1 s: still paused at step 41"
    ]
    assert json.loads(late.stdout)["applied"] is False

    player = answer(store, lambda c: "paused" not in c, {"event": "resumed", "step": 41})
    resumed = elasticctl(*flags, "resume", "--wait", "--json")
    player.join()
    assert resumed.returncode == 0, resumed.stderr
    body = json.loads(resumed.stdout)
    assert body["applied"] is True and body["request"] == {"paused": None}


def test_scale_waits_for_a_round_under_the_new_bounds(run: tuple[list[str], RunStore]) -> None:
    flags, store = run
    old = RoundRecord(4, "closed", "node-a", 1, 2, ("node-a", "node-b"), "127.0.0.1", 29500)
    store._kv.put(store.keys.round, old.to_bytes())
    stuck = elasticctl(*flags, "scale", "--min", "1", "--max", "1", "--wait", "--timeout", "1")
    assert stuck.returncode == 1
    assert "round 4 still runs under min 1, max 2" in stuck.stderr

    def reform() -> None:
        new = RoundRecord(5, "closed", "node-a", 1, 1, ("node-a",), "127.0.0.1", 29500)
        store._kv.put(store.keys.round, new.to_bytes())

    timer = threading.Timer(0.5, reform)
    timer.start()
    scaled = elasticctl(*flags, "scale", "--min", "1", "--max", "1", "--wait")
    timer.join()
    assert scaled.returncode == 0, scaled.stderr
    assert "scale to min 1, max 1 applied: round 5 formed with 1 node(s)" in scaled.stdout


def test_rewind_waits_for_the_rewind_and_fails_at_once_when_the_group_refuses(
    run: tuple[list[str], RunStore], tmp_path: Path
) -> None:
    import torch

    from elastic.checkpoint import CheckpointConfig, CheckpointManager

    flags, store = run
    url = str(tmp_path / "ckpt")
    manager = CheckpointManager(
        CheckpointConfig(url=url), run_id=store.keys.run_id, rank=0, world_size=1
    )
    manager.save(10, {"w": torch.zeros(4)}, meta={})
    manager.mark_known_good(10)
    store.put_status({"state": "running", "checkpoint_url": url})

    def asked(control: dict[str, Any]) -> bool:
        return control.get("rewind") == {"to_step": 10}

    refusal = {"event": "rewind_refused", "to_step": 10, "reason": "no such checkpoint"}
    player = answer(store, asked, refusal)
    refused = elasticctl(*flags, "rewind", "--to-step", "10", "--wait")
    player.join()
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "elasticctl: rewind to step 10: refused: no such checkpoint"
    ]
    store.put_control({"rewind": None})  # what rank 0's daemon does with the request

    player = answer(store, asked, {"event": "rewind", "to_step": 10, "kind": "operator"})
    rewound = elasticctl(*flags, "rewind", "--to-step", "10", "--wait", "-o", "json")
    player.join()
    assert rewound.returncode == 0, rewound.stderr
    assert json.loads(rewound.stdout)["detail"] == "rewound to step 10"


def test_every_command_prints_json(run: tuple[list[str], RunStore]) -> None:
    flags, store = run
    publish_running(store, now=time.time())
    for argv in (["status"], ["events"], ["pause"], ["scale", "--min", "1", "--max", "2"]):
        proc = elasticctl(*flags, *argv, "-o", "json")
        assert proc.returncode == 0, (argv, proc.stderr)
        json.loads(proc.stdout)
    requested = json.loads(elasticctl(*flags, "resume", "--json").stdout)
    assert requested["request"] == {"paused": None} and "@" in requested["by"]
    completion = json.loads(elasticctl("completion", "zsh", "--json").stdout)
    assert completion["shell"] == "zsh" and "#compdef elasticctl" in completion["script"]


# ----------------------------------------------------------------- completion
def test_completion_scripts_complete_commands_and_flags() -> None:
    bash = elasticctl("completion", "bash")
    assert bash.returncode == 0, bash.stderr
    for word in ("status", "checkpoints", "--watch", "--wait", "--to-step", "completion"):
        assert word in bash.stdout
    assert "_shtab_compgen_files" in bash.stdout  # --config FILE completes file names
    zsh = elasticctl("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef elasticctl")
    bad = elasticctl("completion", "cmd.exe")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
