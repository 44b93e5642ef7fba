from __future__ import annotations

import pytest

from elastic.checkpoint import CheckpointConfig
from elastic.config import ConfigError, build, to_dict


def test_defaults_are_valid() -> None:
    config = CheckpointConfig()
    assert config.interval_steps == 50
    assert config.keep_last == 4  # the smallest that satisfies the rewind retention rule
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
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last=1: must be >= 2"):
        build(CheckpointConfig, {"keep_last": 1}, path="checkpoint.")


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'async_save'"):
        build(CheckpointConfig, {"async_save": True})
