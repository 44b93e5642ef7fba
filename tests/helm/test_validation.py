"""Rendered manifests against the Kubernetes and prometheus-operator schemas; values against
values.schema.json (wrong types, unknown keys, bad enums are refused) and values.yaml's docs."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import DaemonConfig, NodesConfig, WatchdogConfig, WorkerConfig
from daemon.stragglers import StragglersConfig
from elastic.checkpoint.config import CheckpointConfig
from elastic.config import yaml_key
from elastic.rendezvous import EtcdConfig
from tests.helm.chart import (
    CHART,
    CI_VALUES,
    KUBE_VERSION,
    VARIANT_IDS,
    VARIANTS,
    RenderError,
    crd_validate,
    missing_tool,
    render,
)

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
SCHEMA = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
VALUES_TEXT = (CHART / "values.yaml").read_text(encoding="utf-8")
# Config keys the chart fills in from its own values (never taken from `config`).
CHART_OWNED = {
    "": {"run_id", "run_dir", "nproc_per_node", "drain", "metrics"},
    "nodes": {"min", "max", "address"},
    "etcd": {"endpoints", "tls_ca", "tls_cert", "tls_key", "user", "password"},
    "checkpoint": {"url"},
    "watchdog": set(),
    "worker": set(),
    "stragglers": set(),
}
SECTION_CLASSES: dict[str, type] = {
    "nodes": NodesConfig,
    "etcd": EtcdConfig,
    "checkpoint": CheckpointConfig,
    "watchdog": WatchdogConfig,
    "worker": WorkerConfig,
    "stragglers": StragglersConfig,
}


def _kubernetes_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing_tool("kubernetes-validate")
    return kubernetes_validate


@pytest.mark.parametrize(("variant", "values"), VARIANTS, ids=VARIANT_IDS)
def test_every_manifest_passes_kubernetes_validate_strict(
    variant: str, values: tuple[Path, ...]
) -> None:
    kv = _kubernetes_validate()
    failures = []
    docs = [d for d in render(values) if d["kind"] not in CRD_KINDS]
    for doc in docs:
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except (kv.ValidationError, kv.SchemaNotFoundError) as exc:
            # The first lines name the rule and the path; the rest is the whole schema.
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {str(exc)[:400]}")
    assert failures == []
    assert len(docs) >= 5  # at least ServiceAccount, ConfigMap, Service, StatefulSet, PDB


def test_kubernetes_validate_strict_rejects_an_unknown_container_field() -> None:
    kv = _kubernetes_validate()
    sts = next(d for d in render() if d["kind"] == "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, KUBE_VERSION, strict=True)


def test_service_monitor_and_prometheus_rule_pass_their_crd_schemas() -> None:
    monitoring = next(p for p in CI_VALUES if p.name == "monitoring-values.yaml")
    docs = [d for d in render([monitoring]) if d["kind"] in CRD_KINDS]
    assert {d["kind"] for d in docs} == CRD_KINDS
    results = crd_validate(docs)
    assert [(r["kind"], r["errors"]) for r in results] == [(d["kind"], []) for d in docs]


def test_crd_check_rejects_a_bad_duration_and_a_rule_without_expr() -> None:
    monitoring = next(p for p in CI_VALUES if p.name == "monitoring-values.yaml")
    docs = [d for d in render([monitoring]) if d["kind"] in CRD_KINDS]
    by_kind = {d["kind"]: d for d in docs}
    by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["interval"] = "5 seconds"
    del by_kind["PrometheusRule"]["spec"]["groups"][0]["rules"][0]["expr"]
    errors = {r["kind"]: " ".join(r["errors"]) for r in crd_validate(docs)}
    assert "interval must match pattern" in errors["ServiceMonitor"]
    assert "must have required property expr" in errors["PrometheusRule"]


@pytest.mark.parametrize(
    ("args", "path", "complaint"),
    [
        (["--set", "replicas=two"], "/replicas", "got string, want integer"),
        (["--set-json", "gpu.count=1.5"], "/gpu/count", "want integer"),
        (["--set", "shm.enabled=yes"], "/shm/enabled", "want boolean"),
        (["--set", "replica=3"], "", "additional properties 'replica' not allowed"),
        (["--set", "etcd.bundled.image.digest=x"], "/etcd/bundled/image", "'digest' not allowed"),
        (["--set", "etcd.mode=embedded"], "/etcd/mode", "value must be one of"),
        (["--set", "checkpoint.storage=gcs"], "/checkpoint/storage", "value must be one of"),
        (["--set", "etcd.bundled.replicas=2"], "/etcd/bundled/replicas", "value must be one of"),
        (["--set", "monitoring.serviceMonitor.interval=5 s"], "/monitoring/serviceMonitor", ""),
        (["--set", "config.drain.timeout_seconds=5"], "/config", "'drain' not allowed"),
        (["--set", "config.nodes.min=2"], "/config/nodes", "'min' not allowed"),
        (["--set", "config.etcd.endpoints={a:1}"], "/config/etcd", "'endpoints' not allowed"),
        (["--set", "config.checkpoint.url=/x"], "/config/checkpoint", "'url' not allowed"),
        (["--set", "config.watchdog.timeout=5"], "/config/watchdog", "'timeout' not allowed"),
        (["--set", "config.trian.steps=5"], "/config", "'trian' not allowed"),
        (["--set", "config.worker.command=python train.py"], "/config/worker/command", "array"),
        (["--set-json", 'config.worker.env={"A":1}'], "/config/worker/env/A", "want string"),
        (["--set", "etcd.bundled.tls.enabled=yes"], "/etcd/bundled/tls/enabled", "want boolean"),
        (["--set", "etcd.bundled.tls.existingSecret=Etcd_TLS"], "/etcd/bundled/tls", "pattern"),
        (["--set", "etcd.bundled.tls.validityDays=0"], "/etcd/bundled/tls/validityDays", ""),
        (["--set", "etcd.bundled.tls.secretName=x"], "/etcd/bundled/tls", "'secretName' not"),
        (["--set", "etcd.bundled.networkPolicy.allowAll=true"], "/etcd/bundled/networkPolicy", ""),
        (
            ["--set-json", 'etcd.bundled.networkPolicy.metricsFrom={"podSelector":{}}'],
            "/etcd/bundled/networkPolicy/metricsFrom",
            "want array",
        ),
    ],
)
def test_the_schema_refuses_wrong_types_unknown_keys_and_bad_enums(
    args: list[str], path: str, complaint: str
) -> None:
    sets = [args[1]] if args[0] == "--set" else []
    set_json = [args[1]] if args[0] == "--set-json" else []
    with pytest.raises(RenderError, match="don't meet the specifications of the schema") as exc:
        render(sets=sets, set_json=set_json)
    assert f"at '{path}" in str(exc.value)
    assert complaint in str(exc.value)


def test_a_values_file_with_a_wrong_type_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("nodes:\n  min: one\n  max: 4\n", encoding="utf-8")
    with pytest.raises(RenderError, match="at '/nodes/min': got string, want integer"):
        render([bad])


def test_values_schema_is_draft_07_with_required_keys_and_closed_objects() -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    values = yaml.safe_load(VALUES_TEXT)

    def walk(schema: dict[str, Any], value: Any, path: str) -> list[str]:
        problems: list[str] = []
        props = schema.get("properties")
        if props is None or not isinstance(value, dict):
            return problems
        if schema.get("additionalProperties") is not False:
            problems.append(f"{path or '<root>'}: additionalProperties is not false")
        if path != "config" and not path.startswith("config."):
            missing = set(value) - set(schema.get("required", []))
            problems += [f"{path}.{k}: not required" for k in sorted(missing)]
        for key, sub in props.items():
            if "description" not in sub and "$ref" not in sub and key != "global":
                problems.append(f"{path}.{key}: no description")
            if key in value:
                problems += walk(sub, value[key], f"{path}.{key}".lstrip("."))
        return problems

    assert walk(SCHEMA, values, "") == []


def test_values_yaml_starts_with_the_schema_modeline() -> None:
    assert VALUES_TEXT.splitlines()[0] == "# yaml-language-server: $schema=values.schema.json"


def test_every_key_in_values_yaml_has_a_comment() -> None:
    key = re.compile(r"^(\s*)([A-Za-z0-9_.\-/\"]+):(\s|$)")
    lines = VALUES_TEXT.splitlines()
    uncommented = []
    in_item_indent: int | None = None  # keys inside a list item are data, not values keys
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if stripped.startswith("- "):
            in_item_indent = indent
            continue
        if in_item_indent is not None and stripped and indent > in_item_indent:
            continue
        in_item_indent = None
        match = key.match(line)
        if not match or "#" in line.split(":", 1)[1]:
            continue
        previous = next((p for p in reversed(lines[:i]) if p.strip()), "")
        if not previous.lstrip().startswith("#"):
            uncommented.append(f"{i + 1}: {line}")
    assert uncommented == []


def _json_types(tp: Any) -> set[str]:
    """JSON schema types a config field of Python type ``tp`` accepts."""
    if typing.get_origin(tp) in (typing.Union, type(int | None)):
        out: set[str] = set()
        for arg in typing.get_args(tp):
            out |= {"null"} if arg is type(None) else _json_types(arg)
        return out
    origin = typing.get_origin(tp) or tp
    mapping = {int: {"integer"}, float: {"number"}, str: {"string"}, bool: {"boolean"}}
    mapping |= {tuple: {"array"}, list: {"array"}, dict: {"object"}}
    return mapping[origin]


def test_config_sections_in_the_schema_match_the_daemon_config() -> None:
    config = SCHEMA["properties"]["config"]
    daemon_keys = {yaml_key(f) for f in dataclasses.fields(DaemonConfig)}
    assert set(config["properties"]) | CHART_OWNED[""] == daemon_keys
    assert not set(config["properties"]) & CHART_OWNED[""]
    for section, cls in SECTION_CLASSES.items():
        hints = typing.get_type_hints(cls)
        fields = {yaml_key(f): hints[f.name] for f in dataclasses.fields(cls)}
        props = config["properties"][section]["properties"]
        assert set(props) == set(fields) - CHART_OWNED[section], section
        for key, prop in props.items():
            declared = prop.get("type")
            declared_types = {declared} if isinstance(declared, str) else set(declared or ())
            if declared_types:
                assert declared_types <= _json_types(fields[key]) | {"integer"}, f"{section}.{key}"
