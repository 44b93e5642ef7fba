"""The mixture sampler: proportions, stages, world-size independence, skip/reshuffle ledger."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from elastic.config import build
from elastic.worker.ledger import DataLedger, LedgerEntry
from model import corpus, prepare
from model.data_config import DataConfig
from model.gpt import IGNORE_INDEX
from model.mixture import Sampler, Stage, build_sampler
from model.shards import ShardWriter, open_shard

SEQ_LEN = 8
WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for name in WEIGHTS:
        writer = ShardWriter(
            str(root / name), source=name, tokenizer="byte", vocab_size=257, eos_id=256
        )
        for _ in range(50):
            writer.add(rng.integers(0, 256, size=400))
        writer.close(holdout_fraction=0.1)
    return root


def _sampler(
    shard_dir: Path,
    *,
    stages: list[Stage] | None = None,
    batch: int = 12,
    ledger: DataLedger | None = None,
    seed: int = 7,
) -> Sampler:
    return Sampler(
        {name: open_shard(str(shard_dir / name)) for name in WEIGHTS},
        stages=stages or [Stage(0, WEIGHTS, SEQ_LEN)],
        seed=seed,
        global_batch_tokens=batch * SEQ_LEN,
        ledger=ledger,
    )


def test_source_proportions_match_the_weights_over_10000_samples(shard_dir: Path):
    sampler = _sampler(shard_dir, batch=1000)
    counts = collections.Counter(s.source for step in range(10) for s in sampler.global_batch(step))
    for name, weight in WEIGHTS.items():
        assert abs(counts[name] / 10_000 - weight) < 0.02, (name, counts)


def test_a_stage_switch_changes_proportions_and_seq_len_at_its_step(shard_dir: Path):
    stages = [Stage(0, WEIGHTS, SEQ_LEN), Stage(5, {"a": 0.0, "b": 0.0, "c": 1.0}, 2 * SEQ_LEN)]
    sampler = _sampler(shard_dir, stages=stages, batch=200)
    assert [sampler.stage_index(s) for s in (0, 4, 5, 99)] == [0, 0, 1, 1]
    assert sampler.weights_at(4) == WEIGHTS and sampler.weights_at(5)["c"] == 1.0
    before = collections.Counter(s.source for s in sampler.global_batch(4))
    after = collections.Counter(s.source for s in sampler.global_batch(5))
    assert len(before) == 3 and set(after) == {"c"}
    assert sampler.batch_size(4) == 200 and sampler.batch_size(5) == 100
    inputs, targets, _ = sampler.local_batch(5, dp_rank=0, dp_size=1, micro_batch_size=100)[0]
    assert inputs.shape == targets.shape == (100, 2 * SEQ_LEN)


def test_batch_of_a_step_is_a_pure_function_of_seed_and_step(shard_dir: Path):
    first = _sampler(shard_dir)
    expected = first.global_batch(9)
    later = _sampler(shard_dir)
    assert later.global_batch(9) == expected  # no history replayed, fresh instance
    assert first.global_batch(9) == expected
    assert _sampler(shard_dir, seed=8).global_batch(9) != expected
    assert first.global_batch(10) != expected


def test_concatenated_rank_slices_equal_the_global_batch_for_any_world_size(shard_dir: Path):
    sampler = _sampler(shard_dir, batch=12)
    reference: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None
    for dp_size in (1, 2, 3, 5, 7):
        parts = [
            micro
            for rank in range(dp_size)
            for micro in sampler.local_batch(3, dp_rank=rank, dp_size=dp_size, micro_batch_size=2)
        ]
        inputs = torch.cat([p[0] for p in parts])
        targets = torch.cat([p[1] for p in parts])
        ids = [i for p in parts for i in p[2]]
        if reference is None:
            reference = (inputs, targets, ids)
        assert torch.equal(inputs, reference[0]) and torch.equal(targets, reference[1])
        assert ids == reference[2] == [s.sample_id for s in sampler.global_batch(3)]


def test_targets_are_inputs_shifted_by_one_token(shard_dir: Path):
    sampler = _sampler(shard_dir)
    sample = sampler.global_batch(0)[0]
    inputs, targets, _ = sampler.local_batch(0, dp_rank=0, dp_size=1, micro_batch_size=12)[0]
    window = sampler.shards[sample.source].window(sample.offset, SEQ_LEN + 1)
    assert inputs[0].tolist() == window[:-1].tolist() and targets[0].tolist() == window[1:].tolist()
    assert inputs.dtype == torch.int64


def test_an_uneven_batch_splits_into_equal_micro_batch_counts_with_zero_weight_padding(
    shard_dir: Path,
):
    sampler = _sampler(shard_dir, batch=10)  # slices 3, 3, 2, 2
    per_rank = [
        sampler.local_batch(2, dp_rank=rank, dp_size=4, micro_batch_size=1) for rank in range(4)
    ]
    assert [len(micro) for micro in per_rank] == [3, 3, 3, 3]
    ids = [i for micro in per_rank for _, _, batch_ids in micro for i in batch_ids]
    assert ids == [s.sample_id for s in sampler.global_batch(2)]
    padding_inputs, padding_targets, padding_ids = per_rank[3][-1]
    assert padding_ids == [] and padding_inputs.shape == (1, SEQ_LEN)
    assert bool((padding_targets == IGNORE_INDEX).all())


def test_more_ranks_than_samples_names_global_batch_tokens(shard_dir: Path):
    sampler = _sampler(shard_dir, batch=12)
    with pytest.raises(ValueError, match=r"train\.global_batch_tokens=96: 12 samples"):
        sampler.local_batch(0, dp_rank=0, dp_size=13, micro_batch_size=1)


def test_training_windows_stay_inside_the_training_split(shard_dir: Path):
    sampler = _sampler(shard_dir, batch=1000)
    for step in range(3):
        for sample in sampler.global_batch(step):
            index = sampler.shards[sample.source].index
            assert sample.offset >= 0 and sample.offset + SEQ_LEN + 1 <= index.heldout_start


def test_eval_batches_come_from_the_heldout_split_deterministically(shard_dir: Path):
    sampler = _sampler(shard_dir)
    shard = sampler.shards["b"]
    inputs, targets = sampler.eval_batch("b", index=1, batch_size=3, seq_len=SEQ_LEN)
    again, _ = sampler.eval_batch("b", index=1, batch_size=3, seq_len=SEQ_LEN)
    assert torch.equal(inputs, again) and inputs.shape == (3, SEQ_LEN)
    start = shard.index.heldout_start + 3 * SEQ_LEN  # batch 1 starts at window 3
    assert inputs[0].tolist() == shard.window(start, SEQ_LEN).tolist()
    assert targets[2].tolist() == shard.window(start + 2 * SEQ_LEN + 1, SEQ_LEN).tolist()


def _ids(sampler: Sampler, steps: range) -> list[int]:
    return [s.sample_id for step in steps for s in sampler.global_batch(step)]


def test_skip_shifts_later_steps_past_the_skipped_data(shard_dir: Path):
    plain = _sampler(shard_dir)
    skipped = plain.with_ledger(DataLedger().with_entry("skip", 5, 8))
    for step in range(5):
        assert skipped.global_batch(step) == plain.global_batch(step)
    for step in range(5, 15):
        assert skipped.global_batch(step) == plain.global_batch(step + 3)
    used = set(_ids(skipped, range(15)))
    assert len(used) == 15 * 12  # ids never repeat
    assert used.isdisjoint(_ids(plain, range(5, 8)))  # the skipped data is never used


def test_skips_compose_in_the_order_they_were_taken(shard_dir: Path):
    plain = _sampler(shard_dir)
    ledger = DataLedger().with_entry("skip", 10, 20).with_entry("skip", 5, 8)
    sampler = plain.with_ledger(ledger)
    assert [ledger.resolve(s)[0] for s in (4, 5, 6, 7, 8)] == [4, 8, 9, 20, 21]
    assert sampler.global_batch(7) == plain.global_batch(20)
    used = _ids(sampler, range(30))
    assert len(set(used)) == len(used)
    assert set(used).isdisjoint(_ids(plain, range(5, 8)) + _ids(plain, range(10, 20)))


def test_reshuffle_changes_samples_only_inside_its_window(shard_dir: Path):
    plain = _sampler(shard_dir)
    shuffled = plain.with_ledger(DataLedger().with_entry("reshuffle", 5, 8))
    for step in [*range(5), *range(8, 12)]:
        assert shuffled.global_batch(step) == plain.global_batch(step)
    for step in range(5, 8):
        fresh = shuffled.global_batch(step)
        assert [s.offset for s in fresh] != [s.offset for s in plain.global_batch(step)]
        assert fresh == shuffled.with_ledger(shuffled.ledger).global_batch(step)  # deterministic
    ids = _ids(shuffled, range(12)) + _ids(plain, range(12))
    assert len(set(ids)) == 12 * 12 + 3 * 12  # reshuffled samples get new ids


def test_newest_reshuffle_wins_and_follows_a_later_skip(shard_dir: Path):
    first = DataLedger().with_entry("reshuffle", 5, 8)
    second = first.with_entry("reshuffle", 6, 7)
    assert [second.resolve(s) for s in (5, 6, 7)] == [(5, 1), (6, 2), (7, 1)]
    shifted = first.with_entry("skip", 2, 4)  # reshuffled data steps 5..7 now train at 3..5
    assert [shifted.resolve(s) for s in (2, 3, 5, 6)] == [(4, 0), (5, 1), (7, 1), (8, 0)]


def test_ledger_round_trips_through_json():
    ledger = DataLedger().with_entry("skip", 5, 8).with_entry("reshuffle", 1, 3, salt=9)
    assert DataLedger.from_json(ledger.to_json()) == ledger
    assert DataLedger.from_json(json.dumps(ledger.to_json())) == ledger
    assert DataLedger.from_json(None) == DataLedger()
    assert ledger.entries[1] == LedgerEntry("reshuffle", 1, 3, 9)
    with pytest.raises(ValueError, match=r"\[8, 5\)"):
        DataLedger().with_entry("skip", 8, 5)


def test_build_sampler_opens_configured_sources_and_stages(shard_dir: Path):
    config = build(
        DataConfig,
        {
            "sources": [
                {"name": name, "url": str(shard_dir), "weight": w} for name, w in WEIGHTS.items()
            ],
            "stages": [{"start_step": 4, "weights": {"a": 1}, "seq_len": 4}],
        },
        path="data.",
    )
    sampler = build_sampler(config, run_dir="unused", seq_len=SEQ_LEN, global_batch_tokens=96)
    assert sampler.weights_at(0) == pytest.approx(WEIGHTS)
    assert sampler.batch_size(3) == 12 and sampler.batch_size(4) == 24
    assert {s.source for s in sampler.global_batch(4)} == {"a"}


def test_build_sampler_prepares_the_demo_corpus_under_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    docs = {n: [f"{n} text {i} " * 40 for i in range(40)] for n in ("code", "prose", "legal")}
    monkeypatch.setattr(corpus, "collect_demo", lambda **_: docs)
    config = build(DataConfig, {"stages": [{"start_step": 2, "weights": {"legal": 1}}]}, path="")
    sampler = build_sampler(config, run_dir=str(tmp_path), seq_len=SEQ_LEN, global_batch_tokens=96)
    assert (tmp_path / "data" / prepare.DEMO_MANIFEST).is_file()
    assert set(sampler.weights_at(0)) == {"code", "prose", "legal"}
    assert {s.source for s in sampler.global_batch(2)} == {"legal"}
    missing = build(DataConfig, {"stages": [{"start_step": 2, "weights": {"manual": 1}}]})
    with pytest.raises(ValueError, match="manual"):
        build_sampler(missing, run_dir=str(tmp_path), seq_len=SEQ_LEN, global_batch_tokens=96)


def test_sources_shorter_than_a_sample_are_rejected(shard_dir: Path):
    with pytest.raises(ValueError, match="fewer than seq_len"):
        Sampler(
            {name: open_shard(str(shard_dir / name)) for name in WEIGHTS},
            stages=[Stage(0, WEIGHTS, 100_000)],
            seed=0,
            global_batch_tokens=100_000,
        )
