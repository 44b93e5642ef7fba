"""Docs match the code: every configuration key is documented, and nothing documented is gone."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from daemon.config import DaemonConfig
from elastic.config import yaml_key
from model.config import JobConfig

ROOT = Path(__file__).resolve().parent.parent
OPAQUE = {
    *("model", "data", "train", "nodes", "etcd", "watchdog", "drain", "metrics", "worker"),
    "stragglers",
}


def config_keys(cls: type, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + yaml_key(f)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= config_keys(hints[f.name], key + ".")
        elif not (prefix == "" and key in OPAQUE and hints[f.name] is not int):
            keys.add(key)
    return keys


def documented_keys() -> set[str]:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    text = text.split("## `faults`", 1)[0]  # that section's table lists fault kinds, not keys
    return set(re.findall(r"^\| `([a-z0-9_.]+)` \|", text, flags=re.M))


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    code = config_keys(DaemonConfig) | config_keys(JobConfig)
    docs = documented_keys()
    assert sorted(code - docs) == []
    assert sorted(docs - code) == []


def test_readme_quickstart_is_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quickstart, flags=re.S)
    commands = [line for block in blocks for line in block.strip().splitlines()]
    assert commands == [
        "bash .ci/install && elasticd run --config examples/tiny.yaml",
        "bash .ci/run",
    ]
