"""Pods of the rendered chart as local processes: they form a group and train, a third joins
(scale up), one is told to leave with SIGTERM (scale down) and drains within the rendered grace
period; a final SIGTERM to all (uninstall) drains the rest. The etcd they share is the chart's
bundled one, locked down as rendered: TLS with client certificates from the chart's own CA, and
clients without such a certificate are refused while the pods train.

From the rendered StatefulSets we take the containers' command, args and env, the config file
from the ConfigMap the elasticd pods mount, and the certificates from the Secrets the chart
generates with helm's genCA/genSignedCert (used as rendered: no test PKI stands in for them).
etcd runs as ``tests.helm.kubelet.EtcdPod`` describes. What an elasticd pod gets from
Kubernetes is stood in for, and only that (``_standins``):

- the downward API: metadata.name -> the pod name, status.podIP -> 127.0.0.1;
- the ConfigMap volume: the mounted config file is written to a local file, and the args'
  path to it is replaced with the local one;
- the etcd client certificate's Secret volume: its files are written to a local directory, and
  ``ELASTICD_ETCD__TLS_CA``/``TLS_CERT``/``TLS_KEY`` move the config's paths under the mount
  there;
- the pod's own emptyDir and network namespace: ``ELASTICD_RUN_DIR`` and
  ``ELASTICD_METRICS__PORT``/``BIND`` (several pods share one host and loopback here);
- the bundled etcd's DNS names: ``ELASTICD_ETCD__ENDPOINTS`` names the local member, with the
  rendered scheme;
- the shared checkpoint volume: ``checkpoint.pvc.mountPath`` is a local directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.ports import free_port
from elastic.rendezvous import EtcdConfig, EtcdConnectionError, connect
from tests.helm.chart import RELEASE, config_document, container, pod_spec, render
from tests.helm.kubelet import EtcdPod, expand, write_volume
from tests.support.etcd import make_tls_files
from tests.support.procs import REPO, events, read_lines, wait_for

pytestmark = pytest.mark.slow

FULLNAME = f"{RELEASE}-elasticd"
DRAIN_TIMEOUT_SECONDS = 60
GRACE_MARGIN_SECONDS = 20
START_TIMEOUT_SECONDS = 240  # joining includes importing torch in every worker
REGROUP_TIMEOUT_SECONDS = 180


def _values(tmp_path: Path, demo_corpus: Path) -> Path:
    """A CPU-cheap run: tiny model, 24 samples x 32 tokens per step, one worker per pod."""
    values = {
        "replicas": 2,
        "nodes": {"min": 1, "max": 3},
        # One member: the stand-in has one loopback. TLS and the NetworkPolicy as by default.
        "etcd": {"bundled": {"replicas": 1}},
        "gpu": {"count": 0},
        "nprocPerNode": 1,
        "drain": {
            "timeoutSeconds": DRAIN_TIMEOUT_SECONDS,
            "graceMarginSeconds": GRACE_MARGIN_SECONDS,
        },
        "checkpoint": {"storage": "pvc", "pvc": {"mountPath": str(tmp_path / "checkpoints")}},
        "config": {
            "nodes": {"last_call_seconds": 2},
            "etcd": {"ttl_seconds": 3},
            "checkpoint": {"interval_steps": 20, "keep_last": 5, "async": False},
            "rewind": {"min_steps_back": 10, "good_after_steps": 5},
            "watchdog": {
                "timeout_seconds": 30,
                "startup_timeout_seconds": 180,
                "poll_seconds": 0.2,
            },
            "model": {"size": "tiny", "max_seq_len": 32},
            "data": {"demo": True, "demo_dir": str(demo_corpus), "eval_every_steps": 0},
            # Enough steps that no phase races the end; the run ends with SIGTERM to all.
            "train": {
                "steps": 100000,
                "global_batch_tokens": 24 * 32,
                "micro_batch_size": 4,
                "seq_len": 32,
                "warmup_steps": 5,
                "device": "cpu",
            },
        },
    }
    path = tmp_path / "simulation-values.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


@dataclass
class Pod:
    """One simulated pod: the container's process and its stdout (JSON lines)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def events(self, name: str) -> list[dict[str, Any]]:
        return events(self.log, name)

    def steps(self) -> list[dict[str, Any]]:
        return self.events("step")

    def tail(self, num_lines: int = 40) -> str:
        return "\n".join(json.dumps(r) for r in read_lines(self.log)[-num_lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


class Cluster:
    """Starts pods from the rendered manifests the way the kubelet would start the container."""

    def __init__(self, docs: list[dict[str, Any]], *, tmp_path: Path, etcd: EtcdPod) -> None:
        self.container = container(docs)
        self.grace_seconds = int(pod_spec(docs)["terminationGracePeriodSeconds"])
        self.tmp_path = tmp_path
        self.etcd = etcd
        mounts = {m["name"]: m["mountPath"] for m in self.container["volumeMounts"]}
        self.config_mount = mounts["config"]
        # The ConfigMap volume: its keys become files under the mount path.
        self.config_dir = tmp_path / "configmap"
        self.config_dir.mkdir()
        self.document = config_document(docs)
        text = yaml.safe_dump(self.document)
        (self.config_dir / "config.yaml").write_text(text, encoding="utf-8")
        self.etcd_tls = _etcd_tls_files(docs, self.document, tmp_path / "etcd-tls")
        self.pods: list[Pod] = []

    def _local(self, command: list[str]) -> list[str]:
        """The command with paths under the config mount moved to the ConfigMap stand-in."""
        prefix = self.config_mount.rstrip("/") + "/"
        local = str(self.config_dir) + "/"
        return [a.replace(prefix, local) if a.startswith(prefix) else a for a in command]

    def _args(self) -> list[str]:
        return self._local([*self.container["command"], *self.container["args"]])

    def exec(self, pod: Pod, command: list[str]) -> subprocess.CompletedProcess[str]:
        """``kubectl exec <pod> -c elasticd -- command``: the container's env and mounts."""
        return subprocess.run(
            self._local(command),
            cwd=self.tmp_path,
            env=self._env(pod.name),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def _standins(self, pod: str) -> dict[str, str]:
        run_dir = self.tmp_path / pod / "run"
        standins = {
            "ELASTICD_RUN_DIR": str(run_dir),
            "ELASTICD_METRICS__BIND": "127.0.0.1",
            "ELASTICD_METRICS__PORT": str(free_port()),
            "ELASTICD_ETCD__ENDPOINTS": json.dumps([self._etcd_endpoint()]),
        }
        for key, path in self.etcd_tls.items():
            standins[f"ELASTICD_ETCD__{key.upper()}"] = str(path)
        return standins

    def _etcd_endpoint(self) -> str:
        """The local member, with the scheme the rendered endpoints use."""
        (rendered,) = self.document["etcd"]["endpoints"]
        scheme = rendered.split("://", 1)[0]
        assert self.etcd.url.startswith(f"{scheme}://"), (rendered, self.etcd.url)
        return self.etcd.url

    def _env(self, pod: str) -> dict[str, str]:
        """The container's env as the kubelet resolves it, on a minimal base environment."""
        fields = {"metadata.name": pod, "metadata.namespace": "llm", "status.podIP": "127.0.0.1"}
        env = {
            # The image's PATH: the environment elasticd is installed in comes first.
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
        for item in self.container["env"]:
            if "fieldRef" in item.get("valueFrom", {}):
                env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                env[item["name"]] = expand(item["value"], env)
        env.update(self._standins(pod))
        return env

    def start(self, ordinal: int) -> Pod:
        name = f"{FULLNAME}-{ordinal}"
        env = self._env(name)
        args = [expand(a, env) for a in self._args()]
        log = self.tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args,
                cwd=self.tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        pod = Pod(name, proc, log)
        self.pods.append(pod)
        return pod

    def terminate(self, pod: Pod) -> None:
        """What the kubelet does on delete: SIGTERM to the container's main process."""
        pod.proc.send_signal(signal.SIGTERM)

    def steps(self) -> list[dict[str, Any]]:
        rows = [r for p in self.pods for r in p.steps()]
        return sorted(rows, key=lambda r: r["ts"])

    def tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.pods)


def _etcd_tls_files(
    docs: list[dict[str, Any]], document: dict[str, Any], directory: Path
) -> dict[str, Path]:
    """The etcd client certificate's Secret volume, written to ``directory``: the config's
    ``tls_ca``/``tls_cert``/``tls_key`` -> the local copy of the file each one names."""
    spec = pod_spec(docs)
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    paths = {k: v for k, v in document["etcd"].items() if k in ("tls_ca", "tls_cert", "tls_key")}
    if not paths:
        return {}
    mount = mounts["etcd-tls"].rstrip("/") + "/"
    assert all(p.startswith(mount) for p in paths.values()), (paths, mount)
    local = write_volume(docs, volumes["etcd-tls"], directory)
    files = {key: local / path.removeprefix(mount) for key, path in paths.items()}
    assert all(f.is_file() for f in files.values()), f"{paths} not all in the mounted Secret"
    return files


def _refusals(etcd: EtcdPod, *, ca: Path, tmp_path: Path) -> dict[str, str]:
    """Clients without the chart's client certificate dial the rendered etcd: what each got."""
    foreign = make_tls_files(tmp_path / "foreign-pki", common_name="intruder")
    attempts: dict[str, dict[str, Any]] = {
        "no client certificate": {"tls_ca": str(ca)},
        "another CA's client certificate": {
            "tls_ca": str(ca),
            "tls_cert": foreign.client_cert,
            "tls_key": foreign.client_key,
        },
        "plain HTTP": {"endpoints": (etcd.url.replace("https://", "http://", 1),)},
    }
    outcomes = {}
    for what, fields in attempts.items():
        config = EtcdConfig(**{"endpoints": (etcd.url,), "connect_timeout_seconds": 2.0, **fields})
        try:
            connect(config).close()
            outcomes[what] = "connected"
        except EtcdConnectionError as exc:
            outcomes[what] = type(exc).__name__
    return outcomes


REFUSED = {
    "no client certificate": "EtcdTlsError",
    "another CA's client certificate": "EtcdTlsError",
    "plain HTTP": "EtcdUnavailableError",  # a TLS-only listener closes the socket
}


@contextlib.contextmanager
def _cluster(docs: list[dict[str, Any]], *, tmp_path: Path) -> Iterator[Cluster]:
    etcd = EtcdPod(docs, tmp_path / "etcd")
    etcd.start()
    cluster = Cluster(docs, tmp_path=tmp_path, etcd=etcd)
    try:
        yield cluster
    finally:
        for pod in cluster.pods:
            pod.stop()
        etcd.kill()


def _wait_world_size(
    cluster: Cluster, size: int, *, after: float, timeout_seconds: float, num_steps: int = 1
) -> int:
    """Wait for ``num_steps`` steps at ``world_size == size`` logged after ``after``; returns
    the first of them."""
    try:
        rows = wait_for(
            lambda: [r for r in cluster.steps() if r["world_size"] == size and r["ts"] > after][
                num_steps - 1 :
            ],
            timeout_seconds=timeout_seconds,
            what=f"{num_steps} step(s) at world size {size}",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.tails()}") from None
    return int(rows[0]["step"])


def _running_status(
    proc: subprocess.CompletedProcess[str], *, world_size: int
) -> dict[str, Any] | None:
    assert proc.returncode == 0, proc.stderr
    status: dict[str, Any] = json.loads(proc.stdout)
    running = status.get("state") == "running" and status.get("world_size") == world_size
    return status if running else None


def _wait_exit(cluster: Cluster, pod: Pod, *, timeout_seconds: float) -> tuple[int, float]:
    started = time.monotonic()
    try:
        code = pod.proc.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{pod.name} still running {timeout_seconds:.0f} s after SIGTERM\n{cluster.tails()}"
        ) from None
    return code, time.monotonic() - started


def test_the_rendered_etcd_admits_the_charts_client_certificate_and_no_other_client(
    tmp_path: Path,
) -> None:
    docs = render(sets=["etcd.bundled.replicas=1"])
    etcd = EtcdPod(docs, tmp_path / "etcd").start()
    try:
        files = _etcd_tls_files(docs, config_document(docs), tmp_path / "etcd-tls")
        assert set(files) == {"tls_ca", "tls_cert", "tls_key"}
        tls = {key: str(path) for key, path in files.items()}
        config = EtcdConfig(
            endpoints=(etcd.url,),
            tls_ca=tls["tls_ca"],
            tls_cert=tls["tls_cert"],
            tls_key=tls["tls_key"],
        )
        client = connect(config)
        try:
            client.put("/elasticd/probe", b"ok")
            stored = client.get("/elasticd/probe")
        finally:
            client.close()
        assert stored is not None and stored.value == b"ok"
        assert _refusals(etcd, ca=files["tls_ca"], tmp_path=tmp_path) == REFUSED
        assert "rejected connection" in etcd.log_tail(num_lines=200)
    finally:
        etcd.kill()


def test_opting_out_serves_plain_http_to_any_client(tmp_path: Path) -> None:
    docs = render(sets=["etcd.bundled.replicas=1", "etcd.bundled.tls.enabled=false"])
    etcd = EtcdPod(docs, tmp_path / "etcd").start()
    try:
        assert etcd.url.startswith("http://")
        assert _etcd_tls_files(docs, config_document(docs), tmp_path / "etcd-tls") == {}
        connect(EtcdConfig(endpoints=(etcd.url,))).close()
    finally:
        etcd.kill()


def test_rendered_pods_train_scale_up_and_drain_within_the_grace_period(
    tmp_path: Path, demo_corpus: Path
) -> None:
    docs = render([_values(tmp_path, demo_corpus)])
    # Findings that do not stop the scenario; asserted at the end so one run reports them all.
    problems: list[str] = []
    with _cluster(docs, tmp_path=tmp_path) as cluster:
        assert cluster.grace_seconds == DRAIN_TIMEOUT_SECONDS + GRACE_MARGIN_SECONDS
        started = time.time()
        first = cluster.start(0)
        cluster.start(1)
        _wait_world_size(cluster, 2, after=started, timeout_seconds=START_TIMEOUT_SECONDS)
        # The NOTES' status command, in a pod: etcd and run id come from the pod's config.
        ctl = ["elasticctl", "--config", "/etc/elasticd/config.yaml", "status", "--json"]
        status = wait_for(
            lambda: _running_status(cluster.exec(first, ctl), world_size=2),
            timeout_seconds=30,
            what="elasticctl status in a pod: running at world size 2",
        )
        assert set(status["members"]) == {p.name for p in cluster.pods}

        # While the pods train over TLS with the chart's client certificate, etcd turns away
        # every client without one, and the pods go on training.
        refused_at = time.time()
        ca = cluster.etcd_tls["tls_ca"]
        assert _refusals(cluster.etcd, ca=ca, tmp_path=tmp_path) == REFUSED
        _wait_world_size(cluster, 2, after=refused_at, timeout_seconds=60)

        scaled_up = time.time()  # kubectl scale --replicas=3
        third = cluster.start(2)
        joined_at_step = _wait_world_size(
            cluster, 3, after=scaled_up, timeout_seconds=REGROUP_TIMEOUT_SECONDS, num_steps=3
        )
        # Whichever daemon notices the join first drains the group; the others see their
        # workers leave drained. Either way each pod ends exactly one round, as a regroup.
        rounds = [r["decision"] for r in first.events("round_end") if r["ts"] > scaled_up]
        if rounds != ["regroup"]:
            problems.append(f"one join ended the first pod's rounds as {rounds}, not one regroup")

        scaled_down = time.time()  # kubectl scale --replicas=2: the highest ordinal goes
        cluster.terminate(third)
        code, drain_seconds = _wait_exit(cluster, third, timeout_seconds=cluster.grace_seconds)
        assert code == 0, cluster.tails()
        _wait_world_size(cluster, 2, after=scaled_down, timeout_seconds=REGROUP_TIMEOUT_SECONDS)

        uninstalled = time.time()  # helm uninstall: every pod gets SIGTERM
        survivors = cluster.pods[:2]
        for pod in survivors:
            cluster.terminate(pod)
        final = [_wait_exit(cluster, p, timeout_seconds=cluster.grace_seconds) for p in survivors]
        codes = [c for c, _ in final]
        if codes != [0, 0]:
            problems.append(f"exit codes {codes} after SIGTERM to every pod (uninstall)")

    steps = cluster.steps()
    numbers = sorted({int(r["step"]) for r in steps})
    # No step lost across the regroups and the drains: every step from 1 on was trained.
    assert numbers == list(range(1, numbers[-1] + 1))
    assert numbers[-1] > joined_at_step
    # Trained at 2 and at 3 pods; a first round of pod 0 alone (pod 1's workers still
    # importing past the last call; nodes.min is 1) is allowed.
    assert {2, 3} <= {r["world_size"] for r in steps} <= {1, 2, 3}
    # The scaled-down pod left as drained (not killed), after the group committed a checkpoint.
    assert third.events("round_end")[-1]["decision"] == "drained"
    commits = [r for p in cluster.pods for r in p.events("checkpoint_commit")]
    assert any(scaled_down < r["ts"] < scaled_down + drain_seconds for r in commits)
    assert all(r["ts"] < uninstalled + cluster.grace_seconds for r in steps)
    print(
        f"drain of the scaled-down pod: {drain_seconds:.1f} s "
        f"(grace period {cluster.grace_seconds} s); final drains "
        f"{[round(s, 1) for _, s in final]} s; last step {numbers[-1]}"
    )
    assert problems == [], f"{problems}\n{cluster.tails()}"
