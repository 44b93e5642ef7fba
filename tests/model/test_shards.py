"""Token shards on local disk and on a real S3 endpoint (moto_server)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from elastic.config import build
from model import prepare
from model.data_config import DataConfig
from model.mixture import build_sampler
from model.shards import (
    ShardCorrupt,
    ShardNotFound,
    ShardWriter,
    heldout_offset,
    open_shard,
    token_dtype,
)
from tests.support.s3 import S3Bucket

# pytest fixtures, requested by name (the explicit re-export keeps them "used")
from tests.support.s3 import s3_bucket as s3_bucket
from tests.support.s3 import s3_server as s3_server

DOCS = [f"doc {i} " + "words and more words " * 30 for i in range(30)]


def _write(root: Path, *, vocab_size: int = 257) -> None:
    writer = ShardWriter(str(root), source="s", tokenizer="t", vocab_size=vocab_size, eos_id=256)
    writer.add(np.arange(100))
    writer.add(np.array([], dtype=np.int64))  # empty documents are dropped
    writer.add(np.arange(50))
    writer.close(holdout_fraction=0.4)


def test_writer_appends_eos_and_records_documents(tmp_path: Path):
    _write(tmp_path)
    shard = open_shard(str(tmp_path))
    assert shard.index.num_docs == 2 and shard.index.num_tokens == 152
    assert shard.window(99, 3).tolist() == [99, 256, 0]
    assert shard.index.heldout_start == 101  # the second document's start, after the 60% cut
    assert isinstance(shard.tokens, np.memmap)


def test_large_vocabularies_use_32_bit_tokens(tmp_path: Path):
    assert token_dtype(65_535) == "uint16" and token_dtype(65_536) == "uint32"
    _write(tmp_path, vocab_size=100_000)
    assert open_shard(str(tmp_path)).index.dtype == "uint32"
    assert (tmp_path / "tokens.bin").stat().st_size == 152 * 4


def test_heldout_offset_falls_back_to_the_cut_inside_one_long_document():
    assert heldout_offset(1000, [0], holdout_fraction=0.1) == 900
    assert heldout_offset(1000, [0, 500, 950], holdout_fraction=0.1) == 950
    assert heldout_offset(1000, [0], holdout_fraction=0.0) == 1000


def test_missing_and_truncated_shards_are_reported(tmp_path: Path):
    with pytest.raises(ShardNotFound):
        open_shard(str(tmp_path))
    _write(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    index["num_tokens"] = 500
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardCorrupt, match="index says 500"):
        open_shard(str(tmp_path))


def test_windows_outside_the_shard_are_refused(tmp_path: Path):
    _write(tmp_path)
    with pytest.raises(IndexError):
        open_shard(str(tmp_path)).window(150, 5)


def test_a_source_url_without_a_shard_is_a_config_error_naming_the_key(tmp_path: Path):
    config = build(DataConfig, {"sources": [{"name": "web", "url": str(tmp_path)}]}, path="data.")
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.url="):
        build_sampler(config, run_dir=str(tmp_path), seq_len=8, global_batch_tokens=64)


def test_prepare_to_s3_and_train_from_it(tmp_path: Path, s3_bucket: S3Bucket):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"{i:02d}.txt").write_text(doc)
    options = s3_bucket.storage_options
    out = f"{s3_bucket.url}/prepared"
    remote = prepare.prepare_sources(
        {"s": [f"{tmp_path}/*.txt"]}, out, holdout_fraction=0.1, storage_options=options
    )
    local = prepare.prepare_sources({"s": [f"{tmp_path}/*.txt"]}, str(tmp_path / "local"))
    assert remote["s"].sha256 == local["s"].sha256
    shard = open_shard(f"{out}/s", storage_options=options)
    assert shard.index == remote["s"]
    assert (
        shard.window(0, 40).tolist()
        == open_shard(str(tmp_path / "local" / "s")).window(0, 40).tolist()
    )

    config = build(
        DataConfig,
        {"sources": [{"name": "s", "url": out}], "storage_options": options},
        path="data.",
    )
    sampler = build_sampler(config, run_dir=str(tmp_path), seq_len=8, global_batch_tokens=64)
    inputs, _, ids = sampler.local_batch(0, dp_rank=0, dp_size=1, micro_batch_size=8)[0]
    assert inputs.shape == (8, 8) and len(ids) == 8


def test_prepare_reads_remote_inputs(tmp_path: Path, s3_bucket: S3Bucket):
    options = s3_bucket.storage_options
    lines = "\n".join(json.dumps({"text": d}) for d in DOCS)
    from elastic.checkpoint.storage import Storage

    Storage(s3_bucket.url, storage_options=options).write_bytes("raw/docs.jsonl", lines.encode())
    indexes = prepare.prepare_sources(
        {"s": [f"{s3_bucket.url}/raw/docs.jsonl"]},
        str(tmp_path / "out"),
        storage_options=options,
    )
    assert indexes["s"].num_docs == len(DOCS)
    with pytest.raises(prepare.PrepareError, match="not found"):
        prepare.prepare_sources(
            {"s": [f"{s3_bucket.url}/raw/nope.jsonl"]},
            str(tmp_path / "out2"),
            storage_options=options,
        )
