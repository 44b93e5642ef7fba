"""elasticctl finds the run the way the daemon does: the job's config file with its ELASTICD_*
environment, flags on top, TLS and user auth, the embedded etcd's endpoint file; against real
etcd servers (mutual TLS, authentication, an embedded member)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from daemon.embedded_etcd import EmbeddedEtcd, etcd_dir, published_endpoint
from elastic.checkpoint import CheckpointConfig, CheckpointManager
from elastic.rendezvous import EtcdConfig, RunStore, connect
from ops.cli import _parser, requester, target
from tests.support.etcd import EtcdFactory, enable_auth, etcd_factory, make_tls_files
from tests.support.procs import elasticctl, write_config

__all__ = ["etcd_factory"]


def put_status(config: EtcdConfig, run_id: str, status: dict[str, Any]) -> None:
    client = connect(config)
    try:
        RunStore(client, run_id=run_id, key_prefix=config.key_prefix).put_status(status)
    finally:
        client.close()


def resolve(argv: list[str], environ: dict[str, str] | None = None) -> tuple[str, EtcdConfig]:
    run = target(_parser().parse_args([*argv, "status"]), environ or {})
    return run.run_id, run.etcd


# ----------------------------------------------------------------- resolution (no etcd)
def test_flags_override_the_config_file_and_its_environment(tmp_path: Path) -> None:
    job = write_config(
        tmp_path / "job.yaml",
        {
            "run_id": "from-file",
            "etcd": {"endpoints": ["10.0.0.1:2379"], "key_prefix": "/file", "tls_ca": "/f.pem"},
        },
    )
    environ = {"ELASTICD_ETCD__USER": "root", "ELASTICD_ETCD__PASSWORD": "pw"}
    run_id, config = resolve(["--config", str(job)], environ)
    assert (run_id, config.endpoints, config.key_prefix) == (
        "from-file",
        ("10.0.0.1:2379",),
        "/file",
    )
    assert (config.tls_ca, config.user, config.password) == ("/f.pem", "root", "pw")

    argv = ["--config", str(job), "--etcd", "a:1, b:2", "--run-id", "flag", "--tls-ca", "/c.pem"]
    run_id, config = resolve(argv, environ)
    assert (run_id, config.endpoints, config.tls_ca) == ("flag", ("a:1", "b:2"), "/c.pem")
    assert config.key_prefix == "/file"  # not overridden: the file's value stays


def test_without_config_or_flags_the_target_is_the_local_default(tmp_path: Path) -> None:
    run_id, config = resolve([], {"ELASTICD_RUN_DIR": str(tmp_path)})  # no embedded etcd there
    assert (run_id, config.endpoints, config.key_prefix) == (
        "demo",
        ("127.0.0.1:2379",),
        "/elasticd",
    )
    assert not config.uses_tls and config.user is None


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--user", "root"], {}, "--user=root: set ELASTICD_ETCD__PASSWORD"),
        (["--tls-cert", "/c.pem"], {}, "tls_cert='/c.pem': tls_cert and tls_key"),
        (["--run-id", "a/b"], {}, "--run-id='a/b'"),
        (["--key-prefix", "nope"], {}, "key_prefix='nope'"),
        (["--config", "/no/such.yaml"], {}, "--config='/no/such.yaml': file not found"),
        ([], {"ELASTICD_ETCD__TTL_SECONDS": "0"}, "etcd.ttl_seconds=0"),
    ],
)
def test_bad_targets_are_one_line_naming_the_key_and_exit_2(
    argv: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        resolve(argv, environ)
    proc = elasticctl(*argv, "status", env=environ)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elasticctl: ") and message in lines[0]


# ----------------------------------------------------------------- real etcd servers
def test_mutual_tls_from_flags_and_from_the_job_config(
    etcd_factory: EtcdFactory, tmp_path: Path
) -> None:
    tls = make_tls_files(tmp_path / "pki")
    server = etcd_factory(tls=tls)
    secured = EtcdConfig(
        endpoints=(server.url,), tls_ca=tls.ca, tls_cert=tls.client_cert, tls_key=tls.client_key
    )
    put_status(secured, "tls-run", {"state": "running", "world_size": 8})

    flags = ["--etcd", server.url, "--run-id", "tls-run", "--tls-ca", tls.ca]
    cert = ["--tls-cert", tls.client_cert, "--tls-key", tls.client_key]
    proc = elasticctl(*flags, *cert, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["world_size"] == 8

    job = write_config(
        tmp_path / "job.yaml",
        {
            "run_id": "tls-run",
            "etcd": {
                "endpoints": [server.url],
                "tls_ca": tls.ca,
                "tls_cert": tls.client_cert,
                "tls_key": tls.client_key,
            },
        },
    )
    proc = elasticctl("--config", str(job), "status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["state"] == "running"

    refused = elasticctl(*flags, "status")  # the server requires a client certificate
    assert refused.returncode == 1
    assert (
        refused.stderr.startswith("elasticctl: EtcdTlsError") and server.endpoint in refused.stderr
    )


def test_user_and_password_come_from_the_environment_as_in_the_pod(
    etcd_factory: EtcdFactory, tmp_path: Path
) -> None:
    server = etcd_factory()
    enable_auth(server, "s3cret")
    # Plain http on loopback in this test: auth without TLS must be allowed explicitly.
    root = EtcdConfig(
        endpoints=(server.endpoint,), user="root", password="s3cret", allow_insecure_auth=True
    )
    put_status(root, "auth-run", {"state": "running", "last_step": 41})
    job = write_config(
        tmp_path / "job.yaml", {"run_id": "auth-run", "etcd": {"endpoints": [server.endpoint]}}
    )
    insecure = {"ELASTICD_ETCD__ALLOW_INSECURE_AUTH": "true"}
    pod_env = {"ELASTICD_ETCD__USER": "root", "ELASTICD_ETCD__PASSWORD": "s3cret", **insecure}
    proc = elasticctl("--config", str(job), "status", "--json", env=pod_env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["last_step"] == 41
    # The documented form: the user as a flag, the password only in the environment.
    flag = elasticctl(
        "--etcd",
        server.endpoint,
        "--run-id",
        "auth-run",
        "--user",
        "root",
        "status",
        "--json",
        env={"ELASTICD_ETCD__PASSWORD": "s3cret", **insecure},
    )
    assert flag.returncode == 0, flag.stderr
    assert json.loads(flag.stdout)["last_step"] == 41

    wrong = elasticctl(
        "--config", str(job), "status", env={**pod_env, "ELASTICD_ETCD__PASSWORD": "nope"}
    )
    assert wrong.returncode == 1 and wrong.stderr.startswith("elasticctl: EtcdAuthError")


def test_a_run_on_the_embedded_etcd_is_found_through_its_endpoint_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "solo"
    job = write_config(tmp_path / "job.yaml", {"run_id": "solo", "run_dir": str(run_dir)})
    etcd = EmbeddedEtcd(etcd_dir(run_dir))
    etcd.start()
    try:
        assert published_endpoint(run_dir) == etcd.endpoint
        put_status(EtcdConfig(endpoints=(etcd.endpoint,)), "solo", {"state": "running"})
        proc = elasticctl("--config", str(job), "status", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["state"] == "running"
    finally:
        etcd.stop()
    assert published_endpoint(run_dir) is None  # a stopped member is not advertised
    stopped = elasticctl("--config", str(job), "status")
    assert stopped.returncode == 1
    assert stopped.stderr.strip().splitlines() == [
        f"elasticctl: NoEmbeddedEtcd: etcd.endpoints=[] in {job}: the run's embedded etcd is not "
        f"running (no endpoint file under run_dir={str(run_dir)!r}); start elasticd first"
    ]


def test_checkpoints_are_listed_from_the_job_config_with_no_etcd_running(tmp_path: Path) -> None:
    run_dir, ckpt = tmp_path / "runs" / "done", tmp_path / "ckpt"
    job = write_config(
        tmp_path / "job.yaml",
        {"run_id": "done", "run_dir": str(run_dir), "checkpoint": {"url": str(ckpt)}},
    )
    manager = CheckpointManager(
        CheckpointConfig(url=str(ckpt)), run_id="done", rank=0, world_size=1
    )
    for step in (10, 20):
        manager.save(step, {"w": torch.full((4,), float(step))}, meta={})
    listed = elasticctl("--config", str(job), "checkpoints", "--verify", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["step"] for r in rows] == [10, 20] and all(r["problems"] == [] for r in rows)
    # Everything else needs the run's etcd, which is not running.
    paused = elasticctl("--config", str(job), "pause")
    assert paused.returncode == 1 and "NoEmbeddedEtcd" in paused.stderr


def test_control_commands_check_their_bounds_and_record_who_asked(
    etcd_factory: EtcdFactory, tmp_path: Path
) -> None:
    server, ckpt = etcd_factory(), tmp_path / "ckpt"
    job = write_config(
        tmp_path / "job.yaml",
        {
            "run_id": "ctl",
            "etcd": {"endpoints": [server.endpoint]},
            "checkpoint": {"url": str(ckpt)},
        },
    )
    manager = CheckpointManager(CheckpointConfig(url=str(ckpt)), run_id="ctl", rank=0, world_size=1)
    for step in (10, 20):
        manager.save(step, {"w": torch.full((4,), float(step))}, meta={})
    manager.mark_known_good(10)
    ctl = ["--config", str(job)]

    refused = {
        "scale": elasticctl(*ctl, "scale", "--min", "1", "--max", "1000000"),
        "not known-good": elasticctl(*ctl, "rewind", "--to-step", "20"),
        "no checkpoint": elasticctl(*ctl, "rewind", "--to-step", "123456789"),
    }
    for what, proc in refused.items():
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (what, proc.stderr)
    assert "--max=1000000" in refused["scale"].stderr
    assert "newest known-good steps: 10" in refused["not known-good"].stderr
    assert "--to-step=123456789" in refused["no checkpoint"].stderr

    assert elasticctl(*ctl, "rewind", "--to-step", "10").returncode == 0
    assert elasticctl(*ctl, "scale", "--min", "1", "--max", "4").returncode == 0
    client = connect(EtcdConfig(endpoints=(server.endpoint,)))
    try:
        store = RunStore(client, run_id="ctl")
        control = store.get_control()
        events = [e for e in store.events() if e["event"] == "control_request"]
    finally:
        client.close()
    assert control["rewind"] == {"to_step": 10}
    assert control["scale"] == {"min_nodes": 1, "max_nodes": 4}
    assert [e["request"] for e in events] == [
        {"rewind": {"to_step": 10}},
        {"scale": {"min_nodes": 1, "max_nodes": 4}},
    ]
    assert all(e["by"] == requester() for e in events) and "@" in events[0]["by"]
