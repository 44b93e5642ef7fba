"""The worker API's config: its own sections picked, the rest kept, faults gated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from elastic.config import ConfigError
from elastic.faults import FaultConfig
from elastic.protocol import Env
from elastic.worker.config import RunConfig, load

DOCUMENT: dict[str, Any] = {
    "run_id": "exp-7",
    "run_dir": "/runs/exp-7",
    "checkpoint": {"url": "s3://bucket/ckpt", "interval_steps": 25},
    "guard": {"z_threshold": 8.0},
    "rewind": {"data": "skip"},
    "model": {"size": "whatever-the-loop-wants", "layers": [1, 2]},
    "data": {"path": "/data"},
    "train": {"steps": 10, "unknown_to_the_api": True},
    "nodes": {"min": 1, "max": 4},
}


def write(tmp_path: Path, document: dict[str, Any]) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


def test_load_picks_its_sections_and_keeps_the_document(tmp_path: Path) -> None:
    config = load(write(tmp_path, DOCUMENT), environ={})
    assert config.run_id == "exp-7"
    assert config.run_dir == "/runs/exp-7"
    assert config.checkpoint.url == "s3://bucket/ckpt"
    assert config.checkpoint.interval_steps == 25
    assert config.guard.z_threshold == 8.0
    assert config.rewind.data == "skip"
    assert config.faults == ()
    assert config.document == DOCUMENT


def test_sections_the_api_does_not_own_are_not_validated(tmp_path: Path) -> None:
    config = load(write(tmp_path, DOCUMENT), environ={})
    assert config.section("model") == {"size": "whatever-the-loop-wants", "layers": [1, 2]}
    assert config.section("train")["unknown_to_the_api"] is True


def test_a_missing_section_reads_as_empty() -> None:
    assert RunConfig().section("model") == {}


def test_a_section_that_is_not_a_mapping_raises_naming_it() -> None:
    with pytest.raises(ConfigError, match="model"):
        RunConfig(document={"model": [1, 2]}).section("model")


def test_without_a_path_load_reads_the_daemons_file(tmp_path: Path) -> None:
    config = load(None, environ={Env.CONFIG: write(tmp_path, DOCUMENT)})
    assert config.run_id == "exp-7"


def test_without_any_file_load_gives_the_defaults() -> None:
    assert load(None, environ={}) == RunConfig()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    environ = {"ELASTICD_CHECKPOINT__INTERVAL_STEPS": "5"}
    assert load(write(tmp_path, DOCUMENT), environ=environ).checkpoint.interval_steps == 5


def test_faults_are_refused_without_permission(tmp_path: Path) -> None:
    path = write(tmp_path, DOCUMENT | {"faults": [{"kind": "nan", "step": 3}]})
    with pytest.raises(ConfigError, match="faults"):
        load(path, environ={})
    with pytest.raises(ConfigError, match="faults"):
        load(path, environ={Env.ALLOW_FAULTS: "0"})


def test_faults_load_with_permission(tmp_path: Path) -> None:
    path = write(tmp_path, DOCUMENT | {"faults": [{"kind": "nan", "step": 3}]})
    config = load(path, environ={Env.ALLOW_FAULTS: "1"})
    assert config.faults == (FaultConfig(kind="nan", step=3),)


@pytest.mark.parametrize("bad", [0, -5, "often", 2.5])
def test_a_bad_checkpoint_interval_raises_naming_the_key(tmp_path: Path, bad: Any) -> None:
    document = DOCUMENT | {"checkpoint": {"interval_steps": bad}}
    with pytest.raises(ConfigError, match=r"checkpoint\.interval_steps"):
        load(write(tmp_path, document), environ={})


def test_an_unknown_key_in_an_api_section_raises_naming_it(tmp_path: Path) -> None:
    document = DOCUMENT | {"guard": {"z_treshold": 8.0}}
    with pytest.raises(ConfigError, match=r"guard\.z_treshold"):
        load(write(tmp_path, document), environ={})


def test_a_bad_run_id_raises_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run_id"):
        load(write(tmp_path, DOCUMENT | {"run_id": "a/b"}), environ={})
