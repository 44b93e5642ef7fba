"""`elasticd run` configuration: layering, and bad input -> one line, exit 2, nothing written."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon.config import (
    DEFAULT_COMMAND,
    DaemonConfig,
    WorkerConfig,
    resolve,
    resolved_path,
    write_resolved,
)
from elastic.config import ConfigError
from tests.support.procs import REPO, base_env, write_config


def minimal(tmp: Path) -> dict[str, object]:
    return {
        "run_id": "cfg",
        "run_dir": str(tmp / "run"),
        "checkpoint": {"url": str(tmp / "ckpt"), "interval_steps": 50, "keep_last": 4},
        "data": {"demo": True},
    }


def test_env_overrides_yaml_and_set_overrides_env(tmp_path: Path) -> None:
    path = write_config(tmp_path / "job.yaml", minimal(tmp_path))
    environ = {"ELASTICD_WATCHDOG__TIMEOUT_SECONDS": "42", "ELASTICD_NODES__MAX": "3"}
    config, document = resolve(str(path), environ=environ, sets=["nodes.max=5"])
    assert config.watchdog.timeout_seconds == 42
    assert config.nodes.max == 5
    assert document["nodes"]["max"] == 5


def test_faults_are_refused_without_the_allow_switch(tmp_path: Path) -> None:
    doc = {**minimal(tmp_path), "faults": [{"kind": "kill", "step": 3}]}
    path = write_config(tmp_path / "job.yaml", doc)
    with pytest.raises(ConfigError, match="ELASTICD_ALLOW_FAULTS"):
        resolve(str(path), environ={})


def test_keep_last_one_is_accepted_with_the_default_rewind(tmp_path: Path) -> None:
    # interval 10 needed keep_last >= 16 under the retired formula; retention now keeps
    # whatever a rewind may need on top of keep_last.
    checkpoint = {"url": str(tmp_path), "interval_steps": 10, "keep_last": 1}
    path = write_config(tmp_path / "job.yaml", {**minimal(tmp_path), "checkpoint": checkpoint})
    config, _ = resolve(str(path), environ=base_env())
    assert config.checkpoint.keep_last == 1 and config.rewind.enabled


def test_keep_last_zero_is_rejected_naming_the_key(tmp_path: Path) -> None:
    doc = {**minimal(tmp_path), "checkpoint": {"url": str(tmp_path), "keep_last": 0}}
    path = write_config(tmp_path / "job.yaml", doc)
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last=0: must be >= 1"):
        resolve(str(path), environ={})


BAD_INPUT = [
    ({"train": {"bogus": 1}}, "unknown key 'train.bogus'"),
    ({"nodes": {"min": 0}}, "nodes.min=0"),
    ({"train": {"micro_batch_size": -4}}, "train.micro_batch_size=-4"),
    ({"model": {"n_layer": 0}}, "model.n_layer=0"),
    (
        {"data": {"demo": False, "sources": [{"name": "web", "url": "/nope/web"}]}},
        "data.sources[0].url='/nope/web'",
    ),
    (
        {"worker": {"command": "python train.py"}},
        "worker.command='python train.py': must be a list",
    ),
]


@pytest.mark.parametrize(("override", "expected"), BAD_INPUT)
def test_bad_input_is_one_line_naming_key_and_value_exit_2_nothing_written(
    tmp_path: Path, override: dict[str, object], expected: str
) -> None:
    doc = minimal(tmp_path)
    for section, values in override.items():
        doc[section] = {**doc.get(section, {}), **values}  # type: ignore[dict-item]
    path = write_config(tmp_path / "job.yaml", doc)
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(path)],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "ckpt").exists()
    assert not (tmp_path / "run").exists()


def test_world_sizes_of_the_node_range_that_leave_a_rank_without_a_sample_are_exit_2(
    tmp_path: Path, demo_corpus: Path
) -> None:
    doc = {
        **minimal(tmp_path),
        "nodes": {"min": 1, "max": 4},
        "nproc_per_node": 2,
        "data": {"demo_dir": str(demo_corpus)},
        "train": {"global_batch_tokens": 5 * 32, "seq_len": 32, "micro_batch_size": 2},
        "model": {"max_seq_len": 32},
    }
    path = write_config(tmp_path / "job.yaml", doc)
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(path)],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    # World sizes 2, 4, 6, 8: a batch of 5 samples splits unevenly over 2 and 4, not over 6, 8.
    assert "train.global_batch_tokens=160" in lines[0] and "world sizes [6, 8]" in lines[0]
    assert not (tmp_path / "ckpt").exists()
    assert not (tmp_path / "run").exists()


def test_the_all_defaults_document_is_valid() -> None:
    config, _ = resolve(None, environ={})
    assert config.checkpoint.keep_last >= 1 and config.nodes.min == 1


def _write_resolved_repeatedly(path: str, times: int) -> None:
    config, document = resolve(path, environ={})
    for _ in range(times):
        write_resolved(config, document)


def test_daemons_sharing_a_run_dir_write_the_resolved_config_without_racing(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path / "job.yaml", minimal(tmp_path))
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_write_resolved_repeatedly, args=(str(path), 300)) for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    resolved = tmp_path / "run" / "config.resolved.yaml"
    assert yaml.safe_load(resolved.read_text())["run_id"] == "cfg"
    assert sorted(p.name for p in resolved.parent.iterdir()) == ["config.resolved.yaml"]


def _resolve_worker(tmp: Path, worker: dict[str, object], **sections: object) -> DaemonConfig:
    path = write_config(tmp / "job.yaml", {**minimal(tmp), "worker": worker, **sections})
    return resolve(str(path), environ={"PATH": os.environ.get("PATH", "")})[0]


BAD_WORKER = [
    ({"command": "python train.py"}, "worker.command='python train.py': must be a list"),
    ({"command": []}, "worker.command=[]: must be a non-empty list"),
    ({"command": ["python", ""]}, "worker.command=['python', '']: items must be non-empty"),
    ({"command": ["python", None]}, "worker.command[1]=None: must be a string"),
    ({"command": ["{python}", "{nodes}"]}, "worker.command=['{python}', '{nodes}']: unknown"),
    ({"command": ["{python}", "nope.py"]}, "worker.command=['{python}', 'nope.py']: script"),
    ({"command": ["no-such-program-xyz"]}, "program 'no-such-program-xyz' not found"),
    ({"env": ["A=1"]}, "worker.env=['A=1']: must be a mapping"),
    ({"env": {"A": None}}, "worker.env.A=None: must be a string"),
    ({"cwd": "/nope/not/here"}, "worker.cwd='/nope/not/here': not an existing directory"),
    ({"silence_timeout_seconds": -1}, "worker.silence_timeout_seconds=-1.0: must be >= 0"),
]


@pytest.mark.parametrize(("worker", "expected"), BAD_WORKER)
def test_a_bad_worker_value_is_one_config_error_line_naming_key_and_value(
    tmp_path: Path, worker: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        _resolve_worker(tmp_path, worker)
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_a_custom_command_skips_the_bundled_trainers_workload_check(tmp_path: Path) -> None:
    (tmp_path / "loop.py").write_text("print('training')\n")
    custom = {"command": ["{python}", "-u", "loop.py"], "cwd": str(tmp_path)}
    config = _resolve_worker(tmp_path, custom, model={"size": "nonsense"})
    assert config.worker.command == ("{python}", "-u", "loop.py")
    with pytest.raises(ConfigError, match=r"model\.size='nonsense'"):
        _resolve_worker(tmp_path, {}, model={"size": "nonsense"})


def test_a_script_is_looked_up_in_the_workers_directory_and_a_program_on_path(
    tmp_path: Path,
) -> None:
    (tmp_path / "loops").mkdir()
    (tmp_path / "loops" / "loop.py").write_text("")
    in_cwd = {"command": ["python3", "-X", "dev", "loop.py"], "cwd": str(tmp_path / "loops")}
    assert _resolve_worker(tmp_path, in_cwd).worker.cwd == str(tmp_path / "loops")
    module = {"command": ["{python}", "-m", "anything.at.all"]}
    assert _resolve_worker(tmp_path, module).worker.command[1] == "-m"
    program = {"command": ["sh", "-c", "exec {python} -m x"]}
    with pytest.raises(ConfigError, match="unknown placeholder"):
        _resolve_worker(tmp_path, {"command": ["sh", "-c", "{shell}"]})
    assert _resolve_worker(tmp_path, program).worker.command[0] == "sh"


def test_the_command_expands_python_and_config_and_leaves_other_braces_alone() -> None:
    worker = WorkerConfig(command=("{python}", "t.py", "--config={config}", '{"lr": 1}'))
    argv = worker.argv(python="/venv/bin/python", config_path="/run/config.resolved.yaml")
    assert argv == ("/venv/bin/python", "t.py", "--config=/run/config.resolved.yaml", '{"lr": 1}')
    assert WorkerConfig().argv(python="/py", config_path="/c.yaml") == (
        "/py",
        "-P",
        "-m",
        "model.train",
        "--config",
        "/c.yaml",
    )


def test_the_resolved_document_records_the_worker_section(tmp_path: Path) -> None:
    config = _resolve_worker(tmp_path, {"env": {"HF_HOME": "/cache"}})
    resolved = yaml.safe_load(write_resolved(config, {}).read_text())
    assert resolved["worker"]["command"] == list(DEFAULT_COMMAND)
    assert resolved["worker"]["env"] == {"HF_HOME": "/cache"}
    assert resolved_path(config) == str((tmp_path / "run" / "config.resolved.yaml").absolute())
