"""The chart's ConfigMap holds a config elasticd accepts, for every supported variant.

``daemon.config.resolve`` is what ``elasticd run`` calls: it types every section (unknown keys
are errors) and runs the workload's own validator, so these tests tie the chart to the real
config schema. The pod's ``ELASTICD_*`` variables are resolved with it too.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import DaemonConfig, resolve
from elastic.config import ConfigError
from tests.helm.chart import (
    RELEASE,
    VARIANT_IDS,
    VARIANTS,
    config_document,
    container,
    render,
)


def _write(tmp_path: Path, document: dict[str, Any]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return str(path)


def _pod_environ(docs: list[dict[str, Any]], *, pod_ip: str) -> dict[str, str]:
    """The container's plain env as Kubernetes would set it (fieldRefs and $(VAR) resolved);
    secret-backed variables get a placeholder value."""
    fields = {"metadata.name": f"{RELEASE}-elasticd-0", "metadata.namespace": "llm"}
    fields["status.podIP"] = pod_ip
    environ: dict[str, str] = {}
    for item in container(docs)["env"]:
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            environ[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            environ[item["name"]] = f"secret-{source['secretKeyRef']['key']}"
        else:
            value = item["value"]
            for name, known in environ.items():
                value = value.replace(f"$({name})", known)
            environ[item["name"]] = value
    return environ


Resolved = tuple[DaemonConfig, dict[str, Any], dict[str, str], list[dict[str, Any]]]


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Resolved]:
    """Each variant's rendered config resolved once, with its pod's environment (each resolve
    runs the workload validator in a subprocess, which is not cheap)."""

    def one(variant: str, values: tuple[Path, ...]) -> Resolved:
        docs = render(values)
        environ = _pod_environ(docs, pod_ip="10.42.7.9")
        path = _write(tmp_path_factory.mktemp(variant), config_document(docs))
        config, document = resolve(path, environ=environ, sets=())
        return config, document, environ, docs

    # pytest makes its base temp directory on first use, and two threads at once may each make
    # one (then mktemp refuses the other's path): make it here, before the threads.
    tmp_path_factory.getbasetemp()
    # Two at a time: the machine has two cores and each validator is one process.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {variant: pool.submit(one, variant, values) for variant, values in VARIANTS}
        return {variant: future.result() for variant, future in futures.items()}


@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_rendered_config_is_accepted_by_elasticd(
    variant: str, resolved: dict[str, Resolved]
) -> None:
    config, _, _, docs = resolved[variant]
    assert config.metrics.bind == "0.0.0.0"
    assert config.metrics.port == container(docs)["ports"][0]["containerPort"]
    assert config.run_dir == "/var/lib/elasticd"
    assert config.etcd.endpoints  # never the embedded etcd: every pod must share one


@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_the_pods_environment_resolves_to_this_pods_address(
    variant: str, resolved: dict[str, Resolved]
) -> None:
    config, _, environ, _ = resolved[variant]
    assert config.nodes.address == "10.42.7.9"
    if "ELASTICD_ETCD__USER" in environ:
        assert (config.etcd.user, config.etcd.password) == ("secret-username", "secret-password")


def test_chart_values_fill_the_keys_the_chart_owns(resolved: dict[str, Resolved]) -> None:
    config, document, _, _ = resolved["s3"]
    assert config.run_id == "gpt-125m-s3"
    assert (config.nodes.min, config.nodes.max) == (2, 8)
    assert config.nproc_per_node == 8
    assert config.drain.timeout_seconds == 300
    assert config.checkpoint.url == "s3://training-checkpoints/elasticd"
    assert config.checkpoint.async_save is True
    assert document["train"]["min_lr"] == pytest.approx(0.00006)


def test_run_id_defaults_to_the_release_name(resolved: dict[str, Resolved]) -> None:
    assert resolved["default"][0].run_id == RELEASE


def test_a_bad_key_inside_a_section_is_caught_by_elasticd(tmp_path: Path) -> None:
    # The schema leaves guard, rewind and the workload sections open; elasticd checks them.
    document = config_document(render(sets=["config.guard.window_step=10"]))
    with pytest.raises(ConfigError, match=r"unknown key 'guard\.window_step'"):
        resolve(_write(tmp_path, document), environ={})
