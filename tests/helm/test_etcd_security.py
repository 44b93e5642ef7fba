"""The bundled etcd locked down by default, as rendered: TLS for clients and peers with client
certificates from the chart's CA (or from existing Secrets), a NetworkPolicy admitting only the
run's pods, and an opt-out for local experiments. test_pod_simulation.py runs the rendered etcd
with these flags and certificates against real clients."""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.helm.chart import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    RenderError,
    config_document,
    container,
    find,
    helm,
    kinds,
    node_statefulset,
    pod_spec,
    render,
    template_args,
)

CI = {p.name.removesuffix("-values.yaml"): p for p in CI_VALUES}
FULLNAME = f"{RELEASE}-elasticd"
ETCD = f"{FULLNAME}-etcd"
SERVER_SECRET = f"{ETCD}-server-tls"
CLIENT_SECRET = f"{ETCD}-client-tls"
DOMAIN = f"{ETCD}-headless.{NAMESPACE}.svc.cluster.local"
SERVER_CERTS = "/etc/etcd/tls"
CLIENT_CERTS = "/etc/elasticd-tls/etcd"
TLS_FLAGS = {
    "cert-file": f"{SERVER_CERTS}/tls.crt",
    "key-file": f"{SERVER_CERTS}/tls.key",
    "trusted-ca-file": f"{SERVER_CERTS}/ca.crt",
    "client-cert-auth": "true",
    "peer-cert-file": f"{SERVER_CERTS}/tls.crt",
    "peer-key-file": f"{SERVER_CERTS}/tls.key",
    "peer-trusted-ca-file": f"{SERVER_CERTS}/ca.crt",
    "peer-client-cert-auth": "true",
}
OPT_OUT = ["etcd.bundled.tls.enabled=false", "etcd.bundled.networkPolicy.enabled=false"]


def _etcd_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "StatefulSet", ETCD)["spec"]["template"]["spec"]
    return spec


def _etcd_flags(docs: list[dict[str, Any]]) -> dict[str, str]:
    (etcd,) = _etcd_pod(docs)["containers"]
    return dict(a.removeprefix("--").split("=", 1) for a in etcd["args"])


def _secret_files(docs: list[dict[str, Any]], name: str) -> dict[str, bytes]:
    secret = find(docs, "Secret", name)
    assert secret["type"] == "kubernetes.io/tls"
    return {key: base64.b64decode(value) for key, value in secret["data"].items()}


def _by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def test_default_etcd_serves_tls_to_clients_and_peers_and_requires_client_certificates() -> None:
    docs = render()
    flags = _etcd_flags(docs)
    assert flags["listen-client-urls"] == "https://0.0.0.0:2379"
    assert flags["advertise-client-urls"] == f"https://$(POD_NAME).{DOMAIN}:2379"
    assert flags["listen-peer-urls"] == "https://0.0.0.0:2380"
    assert flags["initial-advertise-peer-urls"] == f"https://$(POD_NAME).{DOMAIN}:2380"
    members = [m.split("=", 1)[1] for m in flags["initial-cluster"].split(",")]
    assert members == [f"https://{ETCD}-{i}.{DOMAIN}:2380" for i in range(3)]
    assert {flag: flags.get(flag) for flag in TLS_FLAGS} == TLS_FLAGS
    # The kubelet's probes need no certificate: health and metrics only, on their own port.
    assert flags["listen-metrics-urls"] == "http://0.0.0.0:2381"
    pod = _etcd_pod(docs)
    (etcd,) = pod["containers"]
    assert etcd["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    mount = {"name": "tls", "mountPath": SERVER_CERTS, "readOnly": True}
    assert _by_name(etcd["volumeMounts"])["tls"] == mount
    secret = {"secretName": SERVER_SECRET, "defaultMode": 0o440}
    assert _by_name(pod["volumes"])["tls"]["secret"] == secret


def test_generated_certificates_share_one_ca_and_name_every_address_clients_dial() -> None:
    docs = render()
    server = _secret_files(docs, SERVER_SECRET)
    client = _secret_files(docs, CLIENT_SECRET)
    assert set(server) == set(client) == {"ca.crt", "tls.crt", "tls.key"}
    assert server["ca.crt"] == client["ca.crt"]
    ca = x509.load_pem_x509_certificate(server["ca.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    certs = {}
    for name, files in (("server", server), ("client", client)):
        cert = x509.load_pem_x509_certificate(files["tls.crt"])
        cert.verify_directly_issued_by(ca)
        key = serialization.load_pem_private_key(files["tls.key"], password=None)
        assert key.public_key() == cert.public_key(), f"{name} key does not match its certificate"
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert lifetime == datetime.timedelta(days=3650)
        certs[name] = cert
    san = certs["server"].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    endpoints = config_document(docs)["etcd"]["endpoints"]
    assert {urlsplit(e).hostname for e in endpoints} <= names
    services = {
        f"{service}{suffix}"
        for service in (ETCD, f"{ETCD}-headless")
        for suffix in ("", f".{NAMESPACE}", f".{NAMESPACE}.svc", f".{NAMESPACE}.svc.cluster.local")
    }
    assert services | {"localhost"} <= names
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # The daemons' certificate names its release and no host (etcd checks no client's address).
    assert certs["client"].subject.rfc4514_string() == f"CN={FULLNAME}"
    with pytest.raises(x509.ExtensionNotFound):
        certs["client"].extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_elasticd_pods_mount_the_client_certificate_and_dial_https_with_it() -> None:
    docs = render()
    etcd = config_document(docs)["etcd"]
    assert etcd["endpoints"] == [f"https://{ETCD}-{i}.{DOMAIN}:2379" for i in range(3)]
    assert (etcd["tls_ca"], etcd["tls_cert"], etcd["tls_key"]) == (
        f"{CLIENT_CERTS}/ca.crt",
        f"{CLIENT_CERTS}/tls.crt",
        f"{CLIENT_CERTS}/tls.key",
    )
    assert not {"user", "password"} & set(etcd)  # client-certificate auth: no password anywhere
    mounts = _by_name(container(docs)["volumeMounts"])
    assert mounts["etcd-tls"] == {"name": "etcd-tls", "mountPath": CLIENT_CERTS, "readOnly": True}
    volume = _by_name(pod_spec(docs)["volumes"])["etcd-tls"]
    assert volume["secret"] == {"secretName": CLIENT_SECRET, "defaultMode": 0o440}
    assert SERVER_SECRET not in json.dumps(pod_spec(docs))  # etcd's own key stays with etcd


def test_network_policy_admits_only_the_runs_pods_to_the_client_port_and_members_to_peers() -> None:
    docs = render()
    policy = find(docs, "NetworkPolicy", ETCD)["spec"]
    etcd_labels = find(docs, "StatefulSet", ETCD)["spec"]["selector"]["matchLabels"]
    node_labels = node_statefulset(docs)["spec"]["selector"]["matchLabels"]
    assert policy["podSelector"] == {"matchLabels": etcd_labels}
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": node_labels}}],
            "ports": [{"protocol": "TCP", "port": 2379}],
        },
        {
            "from": [{"podSelector": {"matchLabels": etcd_labels}}],
            "ports": [{"protocol": "TCP", "port": 2380}],
        },
    ]
    # This release's elasticd pods match the client rule; etcd's own pods and another
    # release's pods (another instance label) do not.
    node_pod = node_statefulset(docs)["spec"]["template"]["metadata"]["labels"]
    etcd_pod = find(docs, "StatefulSet", ETCD)["spec"]["template"]["metadata"]["labels"]
    assert node_labels.items() <= node_pod.items()
    assert not node_labels.items() <= etcd_pod.items()
    assert node_labels["app.kubernetes.io/instance"] == RELEASE


def test_one_member_has_no_peer_rule_and_extra_peers_are_admitted_where_asked() -> None:
    single = find(render([CI["cpu"]]), "NetworkPolicy", ETCD)["spec"]["ingress"]
    assert [rule["ports"] for rule in single] == [[{"protocol": "TCP", "port": 2379}]]
    docs = render([CI["etcd-existing-tls"]])
    client, peers, metrics = find(docs, "NetworkPolicy", ETCD)["spec"]["ingress"]
    backup = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "etcd-backup"}}}
    assert client["from"][1:] == [backup]
    assert peers["ports"] == [{"protocol": "TCP", "port": 2380}]
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert metrics == {
        "from": [{"namespaceSelector": {"matchLabels": monitoring}}],
        "ports": [{"protocol": "TCP", "port": 2381}],
    }


def test_existing_secrets_are_mounted_and_the_chart_generates_no_certificate() -> None:
    docs = render([CI["etcd-existing-tls"]])
    assert "Secret" not in kinds(docs)
    assert {flag: _etcd_flags(docs).get(flag) for flag in TLS_FLAGS} == TLS_FLAGS
    assert _by_name(_etcd_pod(docs)["volumes"])["tls"]["secret"]["secretName"] == "etcd-server-tls"
    volume = _by_name(pod_spec(docs)["volumes"])["etcd-tls"]
    assert volume["secret"]["secretName"] == "etcd-client-tls"
    assert config_document(docs)["etcd"]["tls_cert"] == f"{CLIENT_CERTS}/tls.crt"


def test_opting_out_renders_plain_http_without_certificates_or_a_network_policy() -> None:
    docs = render(sets=OPT_OUT)
    flags = _etcd_flags(docs)
    assert flags["listen-client-urls"] == "http://0.0.0.0:2379"
    assert flags["initial-advertise-peer-urls"] == f"http://$(POD_NAME).{DOMAIN}:2380"
    assert not set(TLS_FLAGS) & set(flags)
    assert not {"Secret", "NetworkPolicy"} & kinds(docs)
    etcd = config_document(docs)["etcd"]
    assert etcd == {"endpoints": [f"http://{ETCD}-{i}.{DOMAIN}:2379" for i in range(3)]}
    assert "etcd-tls" not in _by_name(container(docs)["volumeMounts"])
    assert "volumes" not in _etcd_pod(docs)


def test_tls_and_the_network_policy_are_switched_independently() -> None:
    policy_only = render(sets=["etcd.bundled.tls.enabled=false"])
    assert "NetworkPolicy" in kinds(policy_only) and "Secret" not in kinds(policy_only)
    tls_only = render(sets=["etcd.bundled.networkPolicy.enabled=false"])
    assert "NetworkPolicy" not in kinds(tls_only)
    assert _etcd_flags(tls_only)["client-cert-auth"] == "true"


def test_an_external_etcd_gets_neither_certificates_nor_a_policy_from_the_chart() -> None:
    docs = render([CI["external-etcd-tls"]])
    assert not {"Secret", "NetworkPolicy"} & kinds(docs)
    assert config_document(docs)["etcd"]["tls_ca"] == f"{CLIENT_CERTS}/ca.crt"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["etcd.bundled.tls.existingSecret=etcd-server-tls"],
            "etcd.bundled.tls.existingSecret and existingClientSecret must be given together",
        ),
        (
            ["etcd.bundled.tls.existingClientSecret=etcd-client-tls"],
            "etcd.bundled.tls.existingSecret and existingClientSecret must be given together",
        ),
        (
            [
                "etcd.bundled.tls.enabled=false",
                "etcd.bundled.tls.existingSecret=s",
                "etcd.bundled.tls.existingClientSecret=c",
            ],
            "are set but etcd.bundled.tls.enabled=false",
        ),
    ],
)
def test_inconsistent_certificate_values_are_refused_with_a_message(
    sets: list[str], message: str
) -> None:
    with pytest.raises(RenderError, match="execution error") as excinfo:
        render(sets=sets)
    assert message in str(excinfo.value)


def test_helm_template_cannot_look_up_the_installed_certificates_and_makes_new_ones() -> None:
    # helm upgrade reads the installed Secrets back (lookup); without a cluster there are none.
    cas = set()
    for _ in range(2):
        proc = helm(*template_args(), "--show-only", "templates/etcd-tls.yaml")
        assert proc.returncode == 0, proc.stderr
        cas.add(proc.stdout.split("ca.crt: ", 1)[1].split("\n", 1)[0])
    assert len(cas) == 2


def test_notes_say_how_etcd_is_secured_and_warn_when_it_is_not() -> None:
    def notes(*sets: str) -> str:
        args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
        proc = helm(*args, *(a for s in sets for a in ("--set", s)))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("NOTES:", 1)[1]

    locked = notes()
    assert f"the pods mount theirs from Secret {CLIENT_SECRET}" in locked
    assert f"NetworkPolicy {ETCD}: only this run's pods reach its client port" in locked
    assert "WARNING" not in locked
    opened = notes(*OPT_OUT)
    assert "WARNING: plain HTTP without client authentication" in opened
    assert "NetworkPolicy" not in opened
