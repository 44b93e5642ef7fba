"""Secrets (issue 18): one list of secret keys; config.resolved.yaml is owner-only from its
creation, says so, and holds only the secrets the workers need; no fingerprint depends on a
secret; etcd credentials over a connection without TLS need ``etcd.allow_insecure_auth``."""

from __future__ import annotations

import copy
import dataclasses
import os
import stat
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon import cli
from daemon.config import (
    REDACTED,
    SECRETS,
    DaemonConfig,
    resolve,
    security_warnings,
    write_resolved,
)
from daemon.identity import canonical, fingerprint
from elastic.config import ConfigError, build, layered, to_dict, yaml_key
from elastic.rendezvous.torchrun import config_from_params
from elastic.worker.config import load as load_worker_config
from model.config import JobConfig
from tests.support.jobs import with_overrides
from tests.support.procs import write_config

PASSWORD = "etcd-pw-4f1c"
S3_SECRET = "s3-secret-9b2e"
DATA_SECRET = "data-token-77aa"
CUSTOM = ["{python}", "-c", "pass"]  # a custom command: resolve skips the workload check


def job(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "run_id": "sec",
        "run_dir": str(tmp_path / "run"),
        "worker": {"command": CUSTOM},
        "etcd": {"endpoints": ["https://etcd:2379"], "user": "trainer"},
        "checkpoint": {
            "url": "s3://bucket/ckpt",
            "storage_options": {"key": "AKIA1", "secret": S3_SECRET},
        },
        "data": {"storage_options": {"token": DATA_SECRET}},
    }
    return with_overrides(document, sections)


# ------------------------------------------------------------------ the list of secret keys


def _has_key(cls: type, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if yaml_key(f) == head:
            return not rest or (
                dataclasses.is_dataclass(hints[f.name]) and _has_key(hints[f.name], rest)
            )
    return False


@pytest.mark.parametrize("secret", SECRETS, ids=lambda s: s.key)
def test_every_secret_key_names_a_config_key(secret: Any) -> None:
    assert _has_key(DaemonConfig, secret.key) or _has_key(JobConfig, secret.key)


# ------------------------------------------------------------------ config.resolved.yaml


def test_an_env_only_etcd_password_is_redacted_and_the_file_is_owner_only(tmp_path: Path) -> None:
    path = write_config(tmp_path / "job.yaml", job(tmp_path))
    config, document = resolve(str(path), environ={"ELASTICD_ETCD__PASSWORD": PASSWORD})
    assert config.etcd.password == PASSWORD
    resolved = write_resolved(config, document)
    text = resolved.read_text()
    assert stat.S_IMODE(resolved.stat().st_mode) == 0o600
    assert text.startswith("# SECRETS: mode 600")
    assert PASSWORD not in text
    assert yaml.safe_load(text)["etcd"]["password"] == REDACTED


def test_workers_read_their_storage_credentials_from_the_resolved_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "job.yaml", job(tmp_path))
    config, document = resolve(str(path), environ={"ELASTICD_ETCD__PASSWORD": PASSWORD})
    resolved = write_resolved(config, document)
    worker = load_worker_config(None, environ={"ELASTICD_WORKER_CONFIG": str(resolved)})
    assert worker.checkpoint.storage_options["secret"] == S3_SECRET
    assert worker.section("data")["storage_options"] == {"token": DATA_SECRET}
    # The bundled trainer's own typed view of the same file.
    job_config = build(JobConfig, layered(str(resolved), environ={}))
    assert job_config.data.storage_options == {"token": DATA_SECRET}


def test_the_file_is_created_owner_only_never_widened_or_chmodded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = build(DaemonConfig, job(tmp_path, etcd={"password": PASSWORD}))
    target = tmp_path / "run" / "config.resolved.yaml"
    target.parent.mkdir()
    target.write_text("older daemon: world-readable\n")
    target.chmod(0o644)
    created: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy_open(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            created.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kwargs)

    def no_chmod(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the mode is set at creation, not after")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    write_resolved(config, {})
    monkeypatch.undo()
    assert [(flags & os.O_EXCL, mode) for _, flags, mode in created] == [(os.O_EXCL, 0o600)]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["config.resolved.yaml"]


# ------------------------------------------------------------------ fingerprints


def _typed(document: dict[str, Any]) -> dict[str, Any]:
    return dict(to_dict(build(DaemonConfig, document)))


@pytest.mark.parametrize(
    ("change", "secret"),
    [
        ({"etcd": {"password": "other-password"}}, "other-password"),
        ({"checkpoint": {"storage_options": {"secret": "rotated-key"}}}, "rotated-key"),
        ({"data": {"storage_options": {"token": "rotated-token"}}}, "rotated-token"),
        ({"worker": {"env": {"WANDB_API_KEY": "wandb-key"}}}, "wandb-key"),
    ],
)
def test_configs_differing_only_in_a_secret_have_one_fingerprint_that_reveals_neither(
    tmp_path: Path, change: dict[str, Any], secret: str
) -> None:
    one = job(tmp_path, etcd={"password": PASSWORD})
    other = with_overrides(copy.deepcopy(one), change)
    assert fingerprint(_typed(one)) == fingerprint(_typed(other))
    for document in (one, other):
        text = canonical(_typed(document))
        for value in (secret, PASSWORD, S3_SECRET, DATA_SECRET):
            assert value not in text


def test_a_job_without_secrets_in_covered_sections_keeps_its_previous_fingerprint() -> None:
    # Nodes of one run are upgraded one by one: the value the previous release published for
    # this job (checkpoint credentials and etcd were never covered; data has none here).
    document = {
        "run_id": "r",
        "model": {"size": "tiny"},
        "data": {"seed": 7, "demo": True},
        "train": {"steps": 10},
        "checkpoint": {"url": "s3://b/c", "storage_options": {"secret": "x"}},
        "etcd": {"endpoints": ["https://e:2379"], "user": "u", "password": "p"},
    }
    assert fingerprint(_typed(document)) == "9d614b6d04ac77dc"


# ------------------------------------------------------------------ etcd auth without TLS


INSECURE = [
    {"endpoints": ["http://etcd:2379"], "user": "u", "password": PASSWORD},
    {"endpoints": ["etcd:2379"], "user": "u", "password": PASSWORD},  # no scheme, no TLS files
    {"endpoints": ["https://a:2379", "http://b:2379"], "user": "u", "password": PASSWORD},
]


@pytest.mark.parametrize("etcd", INSECURE)
def test_credentials_over_an_endpoint_without_tls_are_a_config_error(etcd: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as refused:
        build(DaemonConfig, {"etcd": etcd})
    message = str(refused.value)
    assert message.startswith("etcd.allow_insecure_auth=False: ") and "\n" not in message
    assert any(f"{e!r} without TLS" in message for e in etcd["endpoints"])  # names the endpoint
    assert PASSWORD not in message


@pytest.mark.parametrize("etcd", INSECURE)
def test_allow_insecure_auth_accepts_them_with_one_warning(etcd: dict[str, Any]) -> None:
    config = build(DaemonConfig, {"etcd": {**etcd, "allow_insecure_auth": True}})
    (warning,) = security_warnings(config)
    assert warning.startswith("etcd.allow_insecure_auth=true: ") and "without TLS" in warning


@pytest.mark.parametrize(
    "etcd",
    [
        {},  # the quickstart: embedded etcd, no users
        {"endpoints": ["http://etcd:2379"]},  # plain etcd without users
        {"endpoints": ["https://etcd:2379"], "user": "u", "password": "p"},
        {"endpoints": ["etcd:2379"], "tls_ca": "/ca.pem", "user": "u", "password": "p"},
        {"endpoints": ["http://etcd:2379"], "allow_insecure_auth": True},  # nothing to warn of
    ],
)
def test_tls_or_no_credentials_need_no_permission_and_log_no_warning(
    etcd: dict[str, Any],
) -> None:
    assert security_warnings(build(DaemonConfig, {"etcd": etcd})) == ()


def test_credentials_for_the_embedded_etcd_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^etcd\.user='u': needs etcd endpoints"):
        build(DaemonConfig, {"etcd": {"user": "u", "password": "p"}})


def test_elasticd_run_refuses_insecure_auth_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = job(tmp_path, etcd={"endpoints": ["http://etcd:2379"], "password": PASSWORD})
    path = write_config(tmp_path / "job.yaml", document)
    assert cli.main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("elasticd: invalid config: etcd.allow_insecure")
    assert PASSWORD not in err[0]
    assert not (tmp_path / "run").exists()


def test_torchrun_rdzv_conf_takes_allow_insecure_auth() -> None:
    from torch.distributed.elastic.rendezvous.api import RendezvousParameters

    conf = {"user": "u", "password": "p"}
    with pytest.raises(ValueError, match=r"rdzv_conf\.allow_insecure_auth=False"):
        config_from_params(RendezvousParameters("etcd3", "etcd:2379", "job", 1, 2, **conf))
    params = RendezvousParameters(
        "etcd3", "etcd:2379", "job", 1, 2, allow_insecure_auth="true", **conf
    )
    assert config_from_params(params).allow_insecure_auth is True
