"""The ``data`` config section: what it accepts and the errors it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from elastic.config import ConfigError, build
from model.data_config import DataConfig


def _data(mapping: dict[str, Any]) -> DataConfig:
    return build(DataConfig, mapping, path="data.")


def test_defaults_train_on_the_demo_corpus():
    config = _data({})
    assert config.uses_demo and config.demo_path("/runs/a") == "/runs/a/data"
    assert _data({"demo_dir": "/cache/demo"}).demo_path("/runs/a") == "/cache/demo"


def test_sources_and_stages_build(tmp_path: Path):
    config = _data(
        {
            "sources": [
                {"name": "web", "url": str(tmp_path), "weight": 3},
                {"name": "code", "url": f"file://{tmp_path}", "weight": 1},
                {"name": "books", "url": "s3://bucket/books"},  # remote: checked when opened
            ],
            "stages": [{"start_step": 100, "weights": {"code": 1.0, "web": 0}, "seq_len": 64}],
        }
    )
    assert not config.uses_demo
    assert config.sources[0].weight == 3.0 and config.stages[0].seq_len == 64


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"sources": [{"name": "a", "url": "/nope"}]}, "data.sources[0].url='/nope': not found"),
        ({"sources": [{"name": "a", "url": "TMP", "weight": -1}]}, "data.sources[0].weight=-1"),
        ({"sources": [{"name": "a", "url": "TMP", "weight": 0}]}, "data.sources[0].weight=0"),
        (
            {"sources": [{"name": "a", "url": "TMP"}, {"name": "a", "url": "TMP"}]},
            "data.sources[1].name='a': duplicate",
        ),
        (
            {
                "sources": [{"name": "a", "url": "TMP"}],
                "stages": [{"start_step": 5, "weights": {"b": 1}}],
            },
            "data.stages[0].weights.b='b': unknown source",
        ),
        (
            {"stages": [{"start_step": 5, "weights": {"code": -1, "prose": 1}}]},
            "data.stages[0].weights.code=-1",
        ),
        ({"stages": [{"start_step": 5, "weights": {"code": 0}}]}, "at least one weight > 0"),
        (
            {
                "stages": [
                    {"start_step": 5, "weights": {"code": 1}},
                    {"start_step": 5, "weights": {"prose": 1}},
                ]
            },
            "data.stages[1].start_step=5: stages must start at strictly increasing steps",
        ),
        ({"demo": False}, "data.sources=[]: give at least one source"),
        ({"seed": -1}, "data.seed=-1"),
        ({"eval_batches": 0}, "data.eval_batches=0"),
        ({"shuffle": True}, "unknown key 'data.shuffle'"),
    ],
)
def test_bad_data_config_is_rejected_naming_the_key(
    mapping: dict[str, Any], message: str, tmp_path: Path
):
    for source in mapping.get("sources", []):
        if source["url"] == "TMP":
            source["url"] = str(tmp_path)
    with pytest.raises(ConfigError) as error:
        _data(mapping)
    assert message in str(error.value)
