"""helm/elasticd: lint, render every variant, and the objects the issue asks for, as rendered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops import sync_chart
from tests.helm.chart import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    VARIANT_IDS,
    VARIANTS,
    RenderError,
    config_document,
    container,
    find,
    helm,
    kinds,
    node_statefulset,
    pod_spec,
    render,
)

CI = {p.name.removesuffix("-values.yaml"): p for p in CI_VALUES}
FULLNAME = f"{RELEASE}-elasticd"


def _env(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(docs)["env"]}


def _mounts(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container(docs)["volumeMounts"]}


def _volumes(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(docs)["volumes"]}


def test_ci_values_cover_each_supported_variant() -> None:
    assert set(CI) == {"cpu", "etcd-existing-tls", "external-etcd-tls", "monitoring", "s3"}


@pytest.mark.parametrize(("variant", "values"), VARIANTS, ids=VARIANT_IDS)
def test_helm_lint_strict_is_clean(variant: str, values: tuple[Path, ...]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for path in values:
        args += ["-f", str(path)]
    proc = helm(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    problems = [
        line for line in proc.stdout.splitlines() if line.startswith(("[WARNING]", "[ERROR]"))
    ]
    assert problems == []


@pytest.mark.parametrize(("variant", "values"), VARIANTS, ids=VARIANT_IDS)
def test_every_variant_renders_the_node_objects(variant: str, values: tuple[Path, ...]) -> None:
    docs = render(values)
    assert {"StatefulSet", "ConfigMap", "Service", "PodDisruptionBudget"} <= kinds(docs)
    # Everything lives in the release namespace; only the dashboard may go to Grafana's.
    elsewhere = [d for d in docs if d["metadata"].get("namespace") != NAMESPACE]
    assert [d["metadata"]["name"] for d in elsewhere] in ([], [f"{FULLNAME}-dashboard"])
    assert all(len(d["metadata"]["name"]) <= 63 for d in docs)


def test_container_runs_elasticd_with_the_mounted_config_and_the_pod_name() -> None:
    docs = render()
    c = container(docs)
    assert c["command"] == ["elasticd"]
    assert c["args"] == ["run", "--config", "/etc/elasticd/config.yaml", "--node-id", "$(POD_NAME)"]
    assert _env(docs)["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert _mounts(docs)["config"] == {
        "name": "config",
        "mountPath": "/etc/elasticd",
        "readOnly": True,
    }
    assert _volumes(docs)["config"]["configMap"]["name"] == FULLNAME
    assert "config.yaml" in find(docs, "ConfigMap", FULLNAME)["data"]


def test_peers_reach_a_pod_at_its_ip_through_the_nodes_address_override() -> None:
    env = _env(render())
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    names = list(env)
    # $(POD_IP) only expands when POD_IP is defined earlier in the list.
    assert names.index("POD_IP") < names.index("ELASTICD_NODES__ADDRESS")
    assert env["ELASTICD_NODES__ADDRESS"]["value"] == "$(POD_IP)"


def test_statefulset_is_parallel_one_pod_per_node_behind_the_headless_service() -> None:
    docs = render()
    sts = node_statefulset(docs)
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["replicas"] == 2
    service = find(docs, "Service", FULLNAME)
    assert sts["spec"]["serviceName"] == FULLNAME
    assert service["spec"]["clusterIP"] == "None"
    # Joining or draining pods are not ready but must resolve and be scraped.
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "node"
    anti = pod_spec(docs)["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"


def test_hard_anti_affinity_requires_one_pod_per_kubernetes_node() -> None:
    anti = pod_spec(render([CI["external-etcd-tls"]]))["affinity"]["podAntiAffinity"]
    required = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required[0]["topologyKey"] == "kubernetes.io/hostname"


def test_gpus_are_requested_and_limited_and_cpu_pods_ask_for_none() -> None:
    resources = container(render())["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 8
    assert resources["limits"]["nvidia.com/gpu"] == 8
    assert config_document(render())["nproc_per_node"] == 8
    cpu = render([CI["cpu"]])
    assert "nvidia.com/gpu" not in json.dumps(container(cpu)["resources"])
    assert config_document(cpu)["nproc_per_node"] == 2


def test_node_selector_tolerations_and_affinity_pass_through() -> None:
    docs = render(
        set_json=[
            'nodeSelector={"pool":"h100"}',
            'tolerations=[{"key":"dedicated","operator":"Equal","value":"llm","effect":"NoSchedule"}]',
            'affinity={"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":'
            '{"nodeSelectorTerms":[{"matchExpressions":[{"key":"zone","operator":"In","values":["a"]}]}]}}}',
        ]
    )
    spec = pod_spec(docs)
    assert spec["nodeSelector"] == {"pool": "h100"}
    assert spec["tolerations"][0]["value"] == "llm"
    # An explicit affinity replaces the one-pod-per-node default.
    assert set(spec["affinity"]) == {"nodeAffinity"}


def test_dev_shm_is_a_memory_backed_empty_dir() -> None:
    docs = render()
    assert _mounts(docs)["shm"]["mountPath"] == "/dev/shm"
    assert _volumes(docs)["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert "shm" not in _volumes(render(sets=["shm.enabled=false"]))


def test_grace_period_is_the_drain_timeout_plus_the_margin() -> None:
    docs = render(set_json=["drain.timeoutSeconds=45.5", "drain.graceMarginSeconds=10"])
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == 56
    assert config_document(docs)["drain"] == {"timeout_seconds": 45.5}
    assert pod_spec(render())["terminationGracePeriodSeconds"] == 150


def test_pods_run_non_root_with_a_read_only_root_filesystem() -> None:
    docs = render()
    spec = pod_spec(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    for sts in [d for d in docs if d["kind"] == "StatefulSet"]:
        pod = sts["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # What the daemon and torch write goes to volumes.
    assert {"run", "tmp", "shm", "checkpoints"} <= set(_mounts(docs))
    assert _env(docs)["HOME"]["value"] == "/tmp"


def test_service_links_are_off_so_no_stray_elasticd_variables_reach_the_config() -> None:
    # A Service named <release>-elasticd would inject ELASTICD_* variables (read as config).
    for sts in [d for d in render() if d["kind"] == "StatefulSet"]:
        assert sts["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_probes_use_healthz_and_readyz_on_the_metrics_port() -> None:
    c = container(render())
    assert c["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_pod_disruption_budget_lets_one_pod_go_at_a_time() -> None:
    pdb = find(render(), "PodDisruptionBudget", FULLNAME)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "node"
    assert FULLNAME not in [
        d["metadata"]["name"]
        for d in render(sets=["podDisruptionBudget.enabled=false"])
        if d["kind"] == "PodDisruptionBudget"
    ]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["replicas=5"], "replicas=5 must lie in nodes.min..nodes.max (1..4)"),
        (["nodes.min=3", "replicas=2"], "replicas=2 must lie in nodes.min..nodes.max (3..4)"),
        (["nodes.min=5", "nodes.max=4", "replicas=4"], "nodes.min=5 must be <= nodes.max=4"),
        (["etcd.mode=external"], "etcd.mode=external needs etcd.external.endpoints"),
        (["etcd.external.endpoints={a:2379}"], "set etcd.mode=external"),
        (["checkpoint.storage=s3"], "needs checkpoint.s3.url=s3://BUCKET/PREFIX"),
    ],
)
def test_inconsistent_values_are_refused_with_a_message(sets: list[str], message: str) -> None:
    with pytest.raises(RenderError, match="execution error") as excinfo:
        render(sets=sets)
    assert message in str(excinfo.value)


def test_the_bundled_etcd_must_hold_a_round_per_request_and_a_burst_of_rounds() -> None:
    # Defaults (5m retention, 2 GiB quota) at 2,048 nodes: (300 + 300) s / 5 s = 120 rounds x
    # 2,048 x 768 B = 0.19 GB of history before compaction; the round record 133 KiB.
    render(sets=["nodes.max=2048", "replicas=2048"])
    with pytest.raises(RenderError, match="execution error") as quota:  # 128 MiB < 0.19 GB
        render(sets=["nodes.max=2048", "etcd.bundled.quotaBackendBytes=134217728"])
    assert (
        "nodes.max=2048 with etcd.bundled.autoCompactionRetention=5m: a burst of rounds (one per"
        " 5 s) until compaction would write about 0.19 GB ((retention + min(retention, 1h)) / 5 s"
        " x nodes.max x 768 B), over etcd.bundled.quotaBackendBytes=134217728"
    ) in str(quota.value)
    with pytest.raises(RenderError) as hourly:  # (3600 + 3600) / 5 x 4,096 x 768 B = 4.53 GB
        render(sets=["nodes.max=4096"], set_json=['etcd.bundled.autoCompactionRetention="1h"'])
    assert "nodes.max=4096 with etcd.bundled.autoCompactionRetention=1h" in str(hourly.value)
    assert "would write about 4.53 GB" in str(hourly.value)
    # One close transaction lists every pod name (<= 63 characters + 3) under etcd's 1.5 MiB.
    big_quota = "etcd.bundled.quotaBackendBytes=8589934592"
    render(sets=["nodes.max=23815", big_quota])
    with pytest.raises(RenderError) as record:
        render(sets=["nodes.max=23816", big_quota])
    assert (
        "nodes.max=23816: the closed round record (nodes.max x 66 B + 1 KiB = 1572880 B) would"
        " exceed the bundled etcd's --max-request-bytes=1572864; at most 23815 nodes"
    ) in str(record.value)
    external = ["etcd.mode=external", "etcd.external.endpoints={http://e:2379}"]
    render(sets=["nodes.max=65536", *external])  # an external etcd is the operator's to size
    with pytest.raises(RenderError) as never:
        render(set_json=['etcd.bundled.autoCompactionRetention="0"'])
    assert (
        "etcd.bundled.autoCompactionRetention=0: 0 turns compaction off and every round's writes"
        " stay until etcd's quota stops all writes"
    ) in str(never.value)


def test_the_schema_refuses_the_removed_nodes_keys_and_more_than_65536_nodes() -> None:
    for key in ("keep_alive_seconds", "keep_alive_max_missed", "poll_seconds"):
        with pytest.raises(RenderError, match="don't meet the specifications of the schema"):
            render(sets=[f"config.nodes.{key}=1"])
    external = ["etcd.mode=external", "etcd.external.endpoints={http://e:2379}"]
    with pytest.raises(RenderError, match="don't meet the specifications of the schema"):
        render(sets=["nodes.max=65537", *external])


def test_replicas_zero_parks_the_run_and_the_range_bounds_are_accepted() -> None:
    assert node_statefulset(render(sets=["replicas=0"]))["spec"]["replicas"] == 0
    assert node_statefulset(render(sets=["replicas=4"]))["spec"]["replicas"] == 4
    assert node_statefulset(render(sets=["replicas=1"]))["spec"]["replicas"] == 1


def test_bundled_etcd_is_three_members_with_volumes_from_the_official_image() -> None:
    docs = render()
    etcd = find(docs, "StatefulSet", f"{FULLNAME}-etcd")
    assert etcd["spec"]["replicas"] == 3
    assert etcd["spec"]["podManagementPolicy"] == "Parallel"
    (c,) = etcd["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "gcr.io/etcd-development/etcd:v3.7.2"
    (claim,) = etcd["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": "data", "mountPath": "/var/lib/etcd"} in c["volumeMounts"]
    headless = find(docs, "Service", f"{FULLNAME}-etcd-headless")
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert etcd["spec"]["serviceName"] == headless["metadata"]["name"]
    find(docs, "Service", f"{FULLNAME}-etcd")
    assert find(docs, "PodDisruptionBudget", f"{FULLNAME}-etcd")["spec"]["minAvailable"] == 2


def test_every_etcd_member_is_in_the_initial_cluster_and_in_the_daemon_endpoints() -> None:
    docs = render()
    (c,) = find(docs, "StatefulSet", f"{FULLNAME}-etcd")["spec"]["template"]["spec"]["containers"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    domain = f"{FULLNAME}-etcd-headless.{NAMESPACE}.svc.cluster.local"
    members = [f"{FULLNAME}-etcd-{i}" for i in range(3)]
    assert flags["initial-cluster"] == ",".join(f"{m}=https://{m}.{domain}:2380" for m in members)
    assert flags["advertise-client-urls"] == f"https://$(POD_NAME).{domain}:2379"
    endpoints = config_document(docs)["etcd"]["endpoints"]
    assert endpoints == [f"https://{m}.{domain}:2379" for m in members]


def test_external_etcd_takes_tls_files_and_credentials_from_existing_secrets() -> None:
    docs = render([CI["external-etcd-tls"]])
    assert "StatefulSet" not in [d["kind"] for d in docs if "etcd" in d["metadata"]["name"]]
    etcd = config_document(docs)["etcd"]
    assert etcd["endpoints"][0] == "https://etcd-0.etcd.infra.svc:2379"
    tls_dir = "/etc/elasticd-tls/etcd"
    assert (etcd["tls_ca"], etcd["tls_cert"], etcd["tls_key"]) == (
        f"{tls_dir}/ca.crt",
        f"{tls_dir}/tls.crt",
        f"{tls_dir}/tls.key",
    )
    assert _mounts(docs)["etcd-tls"] == {"name": "etcd-tls", "mountPath": tls_dir, "readOnly": True}
    assert _volumes(docs)["etcd-tls"]["secret"]["secretName"] == "etcd-client-tls"
    env = _env(docs)
    assert env["ELASTICD_ETCD__USER"]["valueFrom"]["secretKeyRef"] == {
        "name": "etcd-user",
        "key": "username",
    }
    assert env["ELASTICD_ETCD__PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    assert "password" not in etcd  # never in the ConfigMap


def test_s3_checkpoints_take_keys_from_the_existing_secret() -> None:
    docs = render([CI["s3"]])
    ckpt = config_document(docs)["checkpoint"]
    assert ckpt["url"] == "s3://training-checkpoints/elasticd"
    assert ckpt["storage_options"] == {
        "endpoint_url": "http://minio.storage.svc:9000",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    env = _env(docs)
    for name, key in [
        ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
        ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    ]:
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "checkpoint-s3", "key": key}
    assert "PersistentVolumeClaim" not in kinds(docs)
    assert "checkpoints" not in _mounts(docs)


def test_pvc_checkpoints_mount_one_shared_claim_that_outlives_the_release() -> None:
    docs = render()
    pvc = find(docs, "PersistentVolumeClaim", f"{FULLNAME}-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    claim = _volumes(docs)["checkpoints"]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]
    assert config_document(docs)["checkpoint"]["url"] == _mounts(docs)["checkpoints"]["mountPath"]
    existing = render([CI["external-etcd-tls"]])
    assert "PersistentVolumeClaim" not in kinds(existing)
    assert _volumes(existing)["checkpoints"]["persistentVolumeClaim"]["claimName"] == (
        "shared-checkpoints"
    )
    assert config_document(existing)["checkpoint"]["url"] == "/mnt/checkpoints"


def test_monitoring_objects_are_off_by_default() -> None:
    docs = render()
    assert not {"ServiceMonitor", "PrometheusRule"} & kinds(docs)
    assert f"{FULLNAME}-dashboard" not in [d["metadata"]["name"] for d in docs]


def test_service_monitor_scrapes_the_metrics_port_keeping_the_daemon_labels() -> None:
    docs = render([CI["monitoring"]])
    sm = find(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "monitoring"
    assert (
        sm["spec"]["selector"]["matchLabels"] == find(docs, "Service", FULLNAME)["spec"]["selector"]
    )
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "interval": "2s",
        "honorLabels": True,
    }


def test_prometheus_rule_holds_the_ops_alert_rules_unchanged() -> None:
    rule = find(render([CI["monitoring"]]), "PrometheusRule")
    source = yaml.safe_load(sync_chart.copies()[0].source.read_text(encoding="utf-8"))
    assert rule["spec"]["groups"] == source["groups"]
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert "ElasticdTrainingStalled" in alerts
    # Prometheus templates reach the rule as written, not expanded by Helm.
    assert "{{ $labels.run_id }}" in json.dumps(rule)


def test_dashboard_config_map_holds_the_ops_dashboard_for_the_grafana_sidecar() -> None:
    cm = find(render([CI["monitoring"]]), "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Training"}
    source = json.loads(sync_chart.copies()[1].source.read_text(encoding="utf-8"))
    assert json.loads(cm["data"]["elasticd.json"]) == source


def test_a_config_change_rolls_the_pods_and_a_scale_does_not() -> None:
    def checksum(docs: list[dict[str, Any]]) -> str:
        annotations = node_statefulset(docs)["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    base = checksum(render())
    assert checksum(render(sets=["config.train.steps=2000"])) != base
    assert checksum(render(sets=["replicas=3"])) == base


def test_notes_tell_how_to_see_status_scale_and_find_the_dashboard() -> None:
    proc = helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
        "-f",
        str(CI["monitoring"]),
    )
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} get pods -l app.kubernetes.io/instance={RELEASE}" in notes
    ctl = "elasticctl --config /etc/elasticd/config.yaml status"
    assert f"exec {FULLNAME}-0 -c elasticd -- {ctl}" in notes
    assert f"kubectl -n {NAMESPACE} scale statefulset/{FULLNAME} --replicas=N" in notes
    assert f"ConfigMap {FULLNAME}-dashboard in namespace monitoring" in notes
    assert "terminationGracePeriodSeconds=150" in notes
