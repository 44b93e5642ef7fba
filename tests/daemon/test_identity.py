"""Node identity (issue 16): the config fingerprint, and refusals of a duplicate node id and of
a node that would train another job under the same run_id."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from daemon.config import DaemonConfig
from daemon.identity import FINGERPRINT_KEY, fingerprint, mismatch
from elastic.config import build, to_dict
from tests.support.daemons import daemons, start_daemon, tiny_job, wait_step
from tests.support.etcd import EtcdServer
from tests.support.jobs import with_overrides
from tests.support.procs import wait_for


def typed(document: dict[str, object]) -> dict[str, object]:
    return to_dict(build(DaemonConfig, document))


def base() -> dict[str, object]:
    return copy.deepcopy(_BASE)


_BASE: dict[str, object] = {
    "run_id": "r",
    "model": {"size": "tiny"},
    "train": {"steps": 10},
    "checkpoint": {"url": "s3://bucket/ckpt"},
}


@pytest.mark.parametrize(
    "per_node",
    [
        {"nodes": {"address": "198.18.0.7", "min": 2, "max": 4}},
        {"metrics": {"port": 9400}, "run_dir": "/local/run"},
        {"etcd": {"endpoints": ["https://etcd:2379"], "user": "u", "password": "hunter2"}},
        {"checkpoint": {"url": "s3://bucket/ckpt", "storage_options": {"secret": "s3cr3t"}}},
        {"worker": {"env": {"WANDB_API_KEY": "k", "NCCL_SOCKET_IFNAME": "eth1"}}},
        {"faults": [{"kind": "kill", "step": 3}], "watchdog": {"timeout_seconds": 99}},
    ],
)
def test_per_node_settings_and_secrets_do_not_change_the_fingerprint(
    per_node: dict[str, object],
) -> None:
    assert fingerprint(typed(with_overrides(base(), per_node))) == fingerprint(typed(base()))


@pytest.mark.parametrize(
    "job_change",
    [
        {"model": {"size": "small"}},
        {"train": {"steps": 11}},
        {"checkpoint": {"url": "s3://other/ckpt"}},
        {"nproc_per_node": 2},
        {"guard": {"z_threshold": 9.0}},
        {"worker": {"command": ["python", "train.py"]}},
    ],
)
def test_what_defines_the_job_changes_the_fingerprint(job_change: dict[str, object]) -> None:
    assert fingerprint(typed(with_overrides(base(), job_change))) != fingerprint(typed(base()))


def test_defaults_written_out_or_left_implicit_fingerprint_alike() -> None:
    explicit = with_overrides(base(), {"checkpoint": {"url": "s3://bucket/ckpt", "keep_last": 4}})
    assert fingerprint(typed(explicit)) == fingerprint(typed(base()))


def test_mismatch_names_the_live_node_and_both_fingerprints() -> None:
    members = {"a": {FINGERPRINT_KEY: "1111"}, "b": {"state": "running"}}  # b: none published
    assert mismatch("1111", members) is None
    line = mismatch("2222", members)
    assert line is not None and "'a'" in line and "1111" in line and "2222" in line
    assert "\n" not in line


@pytest.mark.slow
def test_a_duplicate_node_id_and_another_jobs_config_are_refused_with_one_line(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    doc = tiny_job(
        tmp_path, demo_corpus, endpoint=etcd_server.endpoint, run_id="ids", train={"steps": 400}
    )
    other_job = with_overrides(copy.deepcopy(doc), {"train": {"steps": 401}})
    with daemons() as group:
        first = start_daemon(doc, name="n1", log_dir=tmp_path)
        group.append(first)
        wait_step(group, 2, timeout_seconds=180)
        twin = start_daemon(doc, name="n1", log_dir=tmp_path / "twin")
        stranger = start_daemon(other_job, name="n2", log_dir=tmp_path)
        group += [twin, stranger]
        # The twin waits out one TTL (a crashed predecessor's lease would expire by then).
        assert twin.wait(timeout_seconds=60) == 2
        assert stranger.wait(timeout_seconds=60) == 2
        twin_lines = twin.log.read_text().splitlines()
        refusal = [line for line in twin_lines if line.startswith("elasticd: refused:")]
        assert len(refusal) == 1 and "node id 'n1'" in refusal[0], twin_lines[-5:]
        stranger_lines = stranger.log.read_text().splitlines()
        refusal = [line for line in stranger_lines if line.startswith("elasticd: refused:")]
        assert len(refusal) == 1 and "live node 'n1'" in refusal[0], stranger_lines[-5:]
        # The first daemon never noticed: still training, its key still its own.
        step_before = max(first.steps())
        wait_for(
            lambda: max(first.steps()) > step_before + 2,
            timeout_seconds=60,
            what="n1 training on after the refusals",
        )
        status, body = first.get("/healthz")
        assert status == 200 and body.get("state") == "running"
        assert first.proc.poll() is None
