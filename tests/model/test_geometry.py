"""Which world sizes of the elastic range can train a job's fixed global batch (pure config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from elastic.config import ConfigError, build
from model import config as model_config
from model.config import JobConfig
from model.geometry import check_world_sizes, elastic_world_sizes, stage_batches
from tests.support.procs import write_config


def job(**sections: Any) -> JobConfig:
    doc: dict[str, Any] = {"train": {"global_batch_tokens": 20 * 32, "seq_len": 32}}
    doc.update(sections)
    return build(JobConfig, doc)


def test_the_range_is_nodes_min_to_max_times_nproc_per_node() -> None:
    assert list(elastic_world_sizes(job(nodes={"min": 2, "max": 4}, nproc_per_node=8))) == [
        16,
        24,
        32,
    ]
    assert list(elastic_world_sizes(job())) == [1]


def test_a_batch_that_does_not_divide_by_a_world_size_is_accepted() -> None:
    check_world_sizes(job(), [3, 4, 7, 20])  # the 4 -> 3 nodes with 20 samples
    check_world_sizes(
        job(train={"global_batch_tokens": 1024 * 128, "seq_len": 128, "micro_batch_size": 4}),
        [24, 32],  # 1,024 sequences on 3 or 4 nodes x 8 GPUs
    )


def test_world_sizes_with_a_rank_left_without_a_sample_are_all_named() -> None:
    doc = job(nodes={"min": 1, "max": 4}, nproc_per_node=8)
    with pytest.raises(ConfigError) as raised:
        check_world_sizes(doc, elastic_world_sizes(doc))
    message = str(raised.value)
    assert message.startswith("train.global_batch_tokens=640: 20 samples of 32 tokens")
    assert "world sizes [24, 32] (nodes 1..4 x nproc_per_node=8)" in message


def test_a_later_stage_with_longer_sequences_is_checked_too() -> None:
    doc = job(
        data={"demo": True, "stages": [{"start_step": 100, "weights": {"code": 1}, "seq_len": 128}]}
    )
    assert [(s.start_step, s.num_samples) for s in stage_batches(doc)] == [(0, 20), (100, 5)]
    with pytest.raises(
        ConfigError, match=r"5 samples of 128 tokens per step \(from step 100\).* world sizes \[6\]"
    ):
        check_world_sizes(doc, [4, 6])


def test_model_config_check_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {
        "nodes": {"min": 3, "max": 6},
        "train": {"global_batch_tokens": 4 * 32, "seq_len": 32},
    }
    path = write_config(tmp_path / "job.yaml", doc)
    assert model_config.main(["--config", str(path), "--check"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "train.global_batch_tokens=128" in lines[0]
    assert "world sizes [5, 6]" in lines[0]
    write_config(path, {**doc, "nodes": {"min": 3, "max": 4}})
    assert model_config.main(["--config", str(path), "--check"]) == 0
