"""Every bad input is one line, exit 2, nothing written: the generated cases through the CLI.

A representative subset of tests/daemon/fuzz_configs.py (every start-up check, every
category of mutation, a few workload keys, unparsable files, special files, bad flags) runs
through ``daemon.cli.main`` in its own process: each case is a fork of one driver process
that imported the daemon once (a fresh interpreter costs seconds of CPU here, mostly torch),
with the case's own stderr, environment and exit code. The audit's start-up failures also run
as ``python -m daemon.cli run`` from scratch. Anything else that ends the daemon at start is
one line ``elasticd: <ExceptionType>: ...`` and exit 1, its traceback only in the JSON log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.daemon import fuzz_configs
from tests.daemon.fuzz_configs import VALID, Case
from tests.support.procs import REPO, base_env, read_lines, write_config

CONFIG_ERROR = "elasticd: invalid config: "
# Categories whose every case goes through the CLI: what the daemon checks of this node.
START_CATEGORIES = frozenset(
    {"under-file", "is-file", "missing-file", "not-a-file", "unresolvable", "not-local"}
    | {"in-use", "protocol", "non-ascii"}
)
WORKLOAD_KEYS = ("model.n_layer", "train.beta1", "data.sources[0].url")
TEXT_IDS = ("unclosed flow list", "duplicate key", "not UTF-8", "alias bomb")
DRIVER = """
import json, os, signal, sys
from daemon import cli, config, supervisor  # imported once; every case is a fork
spec = json.load(open(sys.argv[1]))
codes = []
for case in spec:
    err = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    pid = os.fork()
    if pid == 0:
        os.dup2(err, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.environ.update(case["env"])
        signal.alarm(60)  # a case that starts the daemon instead of refusing ends here
        try:
            code = cli.main(case["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stderr.flush()
        os._exit(code)
    os.close(err)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
json.dump(codes, open(sys.argv[2], "w"))
"""


@dataclass
class CliCase:
    id: str
    argv: list[str]
    expected: str  # in the one stderr line
    prefix: str = CONFIG_ERROR
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def selected(cases: Sequence[Case]) -> list[Case]:
    """Every start-up case, the first case of every other category, a few workload keys."""
    bad = [c for c in cases if (c.key, c.category) not in VALID]
    chosen = [c for c in bad if c.category in START_CATEGORIES]
    chosen += [c for c in bad if c.key.startswith("run_id") and c.category == "name"][:2]
    seen: set[str] = set()
    for case in bad:
        daemon_key = not case.key.startswith(fuzz_configs.WORKLOAD_SECTIONS)
        if case.category not in seen and case not in chosen and daemon_key:
            seen.add(case.category)
            chosen.append(case)
    for key in WORKLOAD_KEYS:
        chosen.append(next(c for c in bad if c.key == key and c not in chosen))
    return chosen


def cli_cases(root: Path, busy_port: int) -> list[CliCase]:
    out = []
    cases = selected(fuzz_configs.cases(root, busy_port=busy_port))
    for i, case in enumerate(cases):
        path = write_config(root / f"case-{i}.yaml", case.document)
        argv = ["run", "--config", str(path)]
        out.append(CliCase(case.id, argv, case.key, env=dict(fuzz_configs.ENVIRON)))
    texts = [t for t in fuzz_configs.text_cases() if t.id in TEXT_IDS]
    for i, text in enumerate(texts):
        path = root / f"text-{i}.yaml"
        path.write_bytes(text.text)
        out.append(CliCase(text.id, ["run", "--config", str(path)], text.expected))
    fifo, good = root / "fifo.yaml", write_config(root / "good.yaml", base(root))
    os.mkfifo(fifo)
    out += [
        CliCase("fifo", ["run", "--config", str(fifo)], "not a regular file (a FIFO)"),
        CliCase("directory", ["run", "--config", str(root)], "not a regular file (a directory)"),
        CliCase("node id", ["run", "--config", str(good), "--node-id", "nö/de"], "--node-id="),
        CliCase("bad --set", ["run", "--config", str(good), "--set", "nodes.max"], "--set"),
        CliCase("--set value", ["run", "--config", str(good), "--set", "nodes.max=x"], "nodes.max"),
        CliCase("env value", ["run", "--config", str(good)], "nodes.min=0", env=_env_min_0()),
        CliCase("no --config", ["run"], "--config", prefix="elasticd: usage: "),
        CliCase("bad command", ["fly"], "invalid choice", prefix="elasticd: usage: "),
    ]
    return out


def base(root: Path) -> dict[str, object]:
    return fuzz_configs.base_document(root)


def _env_min_0() -> dict[str, str]:
    return {"ELASTICD_NODES__MIN": "0"}


def run_driver(cases: Sequence[CliCase], work: Path) -> list[tuple[int, str]]:
    """Each case's (exit code, stderr) through daemon.cli.main in a process of its own."""
    stderr_paths = [work / f"stderr-{i}" for i in range(len(cases))]
    spec = [
        {"argv": c.argv, "env": c.env, "stderr": str(p)}
        for c, p in zip(cases, stderr_paths, strict=True)
    ]
    (work / "spec.json").write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, "-c", DRIVER, str(work / "spec.json"), str(work / "codes.json")],
        cwd=REPO,
        env=base_env(),
        timeout=240,
        check=True,
    )
    codes = json.loads((work / "codes.json").read_text())
    return [(code, p.read_text()) for code, p in zip(codes, stderr_paths, strict=True)]


def wrong(case: CliCase, code: int, stderr: str) -> str | None:
    lines = stderr.splitlines()
    if code != 2 or len(lines) != 1:
        return f"exit {code}, {len(lines)} stderr lines: {stderr[-500:]!r}"
    if not lines[0].startswith(case.prefix) or case.expected not in lines[0]:
        return f"expected {case.prefix!r}...{case.expected!r}: {lines[0]}"
    return None


def test_bad_input_through_the_cli_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, busy_port: int
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    fuzz_configs.prepare(root)
    work = tmp_path / "work"
    work.mkdir()
    cases = cli_cases(root, busy_port)
    assert len(cases) >= 40
    started = time.monotonic()
    results = run_driver(cases, work)
    elapsed_seconds = time.monotonic() - started
    problems = [
        f"{case.id}: {p}"
        for case, (code, err) in zip(cases, results, strict=True)
        if (p := wrong(case, code, err))
    ]
    assert problems == [], "\n".join(problems)
    assert not (root / "run").exists() and not (root / "ckpt").exists()
    assert sorted(p.name for p in root.rglob("config.resolved.yaml")) == []
    assert elapsed_seconds < 90


AUDIT = [
    ("run_dir under a file", {"run_dir": "{root}/afile/run"}, "run_dir="),
    ("port in use", {"metrics": {"port": "{port}"}}, "metrics.port={port}: cannot bind"),
    ("unresolvable bind", {"metrics": {"bind": "no-such-host.invalid"}}, "metrics.bind="),
    ("missing TLS file", {"etcd": {"tls_ca": "{root}/nope.pem"}}, "etcd.tls_ca="),
    ("non-ASCII run_id", {"run_id": "lauf-ä"}, "run_id='lauf-ä'"),
    ("infinite join timeout", {"nodes": {"join_timeout_seconds": ".inf"}}, "finite"),
    ("unknown storage protocol", {"checkpoint": {"url": "foo://x"}}, "protocol 'foo'"),
    ("nproc_per_node bound", {"nproc_per_node": 100000}, "must be in 1..1024"),
    ("standby_rounds bound", {"watchdog": {"standby_rounds": 50}}, "must be in 1..8"),
]


def _fill(value: object, root: Path, port: int) -> object:
    if isinstance(value, dict):
        return {k: _fill(v, root, port) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    text = value.replace("{root}", str(root)).replace("{port}", str(port))
    return yaml.safe_load(text) if text in (".inf", str(port)) else text


def test_the_audits_start_up_failures_are_one_line_exit_2_from_a_fresh_process(
    tmp_path: Path, busy_port: int
) -> None:
    fuzz_configs.prepare(tmp_path)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("run_id: a\nnodes: [1, 2\n")
    runs: list[tuple[str, Path, str]] = [
        ("fifo", fifo, f"--config={str(fifo)!r}: not a regular file (a FIFO)"),
        ("yaml syntax", syntax, f"not valid YAML: {syntax}:3:1: "),
    ]
    for name, override, expected in AUDIT:
        document = {**base(tmp_path), **_fill(override, tmp_path, busy_port)}  # type: ignore[dict-item]
        path = write_config(tmp_path / f"{name.replace(' ', '-')}.yaml", document)
        runs.append((name, path, str(_fill(expected, tmp_path, busy_port))))
    procs = [
        (
            name,
            expected,
            subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "run", "--config", str(path)],
                cwd=REPO,
                env=base_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for name, path, expected in runs
    ]
    problems = []
    for name, expected, proc in procs:
        _, stderr = proc.communicate(timeout=120)
        lines = stderr.splitlines()
        ok = proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(CONFIG_ERROR)
        if not (ok and expected in lines[0]):
            problems.append(f"{name}: exit {proc.returncode}: {stderr[-400:]!r}")
    assert problems == []
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()


def test_a_failure_at_start_that_validation_cannot_know_is_one_line_exit_1(tmp_path: Path) -> None:
    document = {**base(tmp_path), "watchdog": {"standby_rounds": 1}}
    # The embedded etcd's data directory is a file: etcd itself refuses to start.
    (tmp_path / "run" / "etcd").mkdir(parents=True)
    (tmp_path / "run" / "etcd" / "data").write_text("not a directory\n")
    path = write_config(tmp_path / "job.yaml", document)
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(path)],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["elasticd: EmbeddedEtcdError: etcd exited with code 1"]
    log = tmp_path / "stdout.log"
    log.write_text(proc.stdout)
    failed = [line for line in read_lines(log) if line.get("event") == "failed"]
    assert len(failed) == 1 and "Traceback" in failed[0]["exception"]
