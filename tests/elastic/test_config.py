"""The layered config loader: defaults < YAML < env < --set, unknown keys and bad values."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from elastic.config import (
    ConfigError,
    build,
    check,
    env_overrides,
    fingerprint,
    layered,
    set_overrides,
    to_dict,
)


@dataclass(frozen=True)
class Inner:
    size: int = 4
    mode: Literal["a", "b"] = "a"
    async_: bool = field(default=False, metadata={"key": "async"})

    def __post_init__(self) -> None:
        check(self.size > 0, "size", self.size, "must be > 0")


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    items: tuple[Inner, ...] = ()


def test_defaults_then_yaml_then_env_then_set(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: yaml\ninner: {size: 2}\n")
    env = {
        "ELASTICD_INNER__SIZE": "3",
        "ELASTICD_NAME": "env",
        "ELASTICD_ALLOW_FAULTS": "1",
        "ELASTICD_WORKER_DIR": "/x",
    }
    doc = layered(str(path), environ=env, sets=["inner.size=5", "inner.async=true"])
    built = build(Outer, doc)
    assert (built.name, built.inner.size, built.inner.async_) == ("env", 5, True)


def test_unknown_keys_name_the_dotted_path() -> None:
    with pytest.raises(ConfigError, match=re.escape("unknown key 'inner.sise'")):
        build(Outer, {"inner": {"sise": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'items\[1\]\.x'"):
        build(Outer, {"items": [{}, {"x": 1}]})


def test_bad_values_name_key_and_value() -> None:
    with pytest.raises(ConfigError, match=re.escape("inner.size=0: must be > 0")):
        build(Outer, {"inner": {"size": 0}})
    with pytest.raises(ConfigError, match=re.escape("inner.mode='c': must be one of a, b")):
        build(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match=re.escape("inner.size='big': must be an integer")):
        build(Outer, {"inner": {"size": "big"}})


def test_env_and_set_parse_yaml_scalars() -> None:
    assert env_overrides({"ELASTICD_A__B": "[1, 2]"}) == {"a": {"b": [1, 2]}}
    assert set_overrides(["a.b=true", "c=3.5"]) == {"a": {"b": True}, "c": 3.5}
    with pytest.raises(ConfigError, match="expected key=value"):
        set_overrides(["novalue"])


def test_round_trip_and_fingerprint_are_stable() -> None:
    built = build(Outer, {"inner": {"async": True}})
    assert to_dict(built)["inner"]["async"] is True
    assert build(Outer, to_dict(built)) == built
    assert fingerprint(built) == fingerprint(build(Outer, to_dict(built)))
    assert fingerprint(built) != fingerprint(Outer())


def test_missing_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="file not found"):
        layered("/nope.yaml", environ={})


@dataclass(frozen=True)
class Rates:
    lr: float = 0.1


def test_exponent_floats_that_yaml_1_1_reads_as_strings_are_numbers() -> None:
    assert build(Rates, {"lr": "1e-7"}).lr == 1e-7
    with pytest.raises(ConfigError, match=re.escape("lr='fast': must be a number")):
        build(Rates, {"lr": "fast"})
