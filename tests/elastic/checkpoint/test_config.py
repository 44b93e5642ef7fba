from __future__ import annotations

import os
from pathlib import Path

import pytest

from elastic.checkpoint import CheckpointConfig
from elastic.config import ConfigError, build, to_dict


def test_defaults_are_valid() -> None:
    config = CheckpointConfig()
    assert config.interval_steps == 50
    assert config.keep_last == 4
    assert config.async_save is False
    assert config.storage_options == {}
    assert config.background_nice == 19


@pytest.mark.parametrize("nice", [-1, 20])
def test_background_nice_outside_0_to_19_is_rejected(nice: int) -> None:
    with pytest.raises(ValueError, match=rf"^background_nice={nice}: must be in 0\.\.19$"):
        CheckpointConfig(background_nice=nice)


def test_yaml_key_async_sets_async_save() -> None:
    config = build(CheckpointConfig, {"async": True, "url": "s3://b/p"})
    assert config.async_save is True
    assert to_dict(config)["async"] is True


def test_storage_options_pass_through_as_a_mapping() -> None:
    options = {"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s"}
    config = build(CheckpointConfig, {"storage_options": options})
    assert config.storage_options == options


def test_zero_interval_is_rejected_with_key_and_value() -> None:
    with pytest.raises(ValueError, match=r"^interval_steps=0: must be > 0$"):
        CheckpointConfig(interval_steps=0)


def test_builder_prefixes_the_section() -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last=0: must be >= 1"):
        build(CheckpointConfig, {"keep_last": 0}, path="checkpoint.")


def test_keep_last_one_is_valid_with_any_interval() -> None:
    for interval in (1, 10, 1000):
        assert CheckpointConfig(keep_last=1, interval_steps=interval).keep_last == 1


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'async_save'"):
        build(CheckpointConfig, {"async_save": True})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "file not found"),
        ("", "the file is empty"),
        ("short\n", "the key has 5 bytes, at least 16"),
        ("fifo", "not a regular file \\(a FIFO\\)"),  # stat'ed, never opened: no hang
    ],
    ids=["missing", "empty", "short", "fifo"],
)
def test_a_bad_signing_key_file_is_one_config_error_naming_key_and_path(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "key"
    if content == "fifo":
        os.mkfifo(path)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=rf"^checkpoint\.signing_key_file='{path}': {problem}"):
        build(CheckpointConfig, {"signing_key_file": str(path)}, path="checkpoint.")


def test_the_signing_key_is_read_once_and_kept_out_of_repr_and_the_resolved_config(
    tmp_path: Path,
) -> None:
    path = tmp_path / "key"
    path.write_text("  s3cr3t-0123456789abcdef \n")
    config = build(CheckpointConfig, {"signing_key_file": str(path)})
    path.unlink()  # read when the config was built; never again
    assert config.signing_key == b"s3cr3t-0123456789abcdef"
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str(to_dict(config))
    assert CheckpointConfig().signing_key is None
