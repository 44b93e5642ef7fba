"""ElasticSampler: indices of a step are a pure function of (seed, step, ledger)."""

from __future__ import annotations

import pytest

from elastic.worker.ledger import DataLedger
from elastic.worker.sampler import ElasticSampler

NUM_SAMPLES = 40
BATCH = 8  # 5 steps per epoch


def sampler(
    *, ledger: DataLedger | None = None, seed: int = 0, rank: int = 0, world_size: int = 1
) -> ElasticSampler:
    fixed = ledger or DataLedger()
    return ElasticSampler(
        NUM_SAMPLES,
        global_batch_size=BATCH,
        seed=seed,
        ledger=lambda: fixed,
        rank=rank,
        world_size=world_size,
    )


def test_indices_depend_only_on_seed_step_and_ledger() -> None:
    walked = sampler()
    history = [walked.global_indices(step) for step in range(1, 21)]
    # A fresh sampler asked out of order (no replay of earlier steps) gives the same answers.
    jumped = sampler()
    for step in (17, 3, 20, 1, 9):
        assert jumped.global_indices(step) == history[step - 1]
    assert sampler(seed=1).global_indices(1) != history[0]


def test_every_index_comes_once_per_epoch() -> None:
    s = sampler()
    steps_per_epoch = NUM_SAMPLES // BATCH
    for epoch in range(3):
        first = 1 + epoch * steps_per_epoch
        seen = [i for step in range(first, first + steps_per_epoch) for i in s.global_indices(step)]
        assert sorted(seen) == list(range(NUM_SAMPLES))


def test_epochs_are_shuffled_differently() -> None:
    s = sampler()
    assert s.global_indices(1) != s.global_indices(1 + NUM_SAMPLES // BATCH)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
def test_local_shares_concatenate_to_the_global_batch(world_size: int) -> None:
    for step in (1, 6, 13):
        shares = [
            sampler(rank=rank, world_size=world_size).local_indices(step)
            for rank in range(world_size)
        ]
        sizes = [len(share) for share in shares]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        assert sizes == [
            sampler(rank=rank, world_size=world_size).local_batch_size for rank in range(world_size)
        ]
        assert [i for share in shares for i in share] == sampler().global_indices(step)


@pytest.mark.parametrize("world_size", [1, 3, 5])
def test_local_micro_batches_are_equal_in_number_on_every_rank(world_size: int) -> None:
    ranks = [sampler(rank=rank, world_size=world_size) for rank in range(world_size)]
    micro = [s.local_micro_batches(6, micro_batch_size=2) for s in ranks]
    assert len({len(m) for m in micro}) == 1
    assert all(len(batch) <= 2 for m in micro for batch in m)
    flat = [i for m in micro for batch in m for i in batch]
    assert flat == sampler().global_indices(6)


def test_more_ranks_than_samples_is_refused_naming_global_batch_size() -> None:
    with pytest.raises(ValueError, match=r"global_batch_size=8: fewer samples than ranks"):
        sampler(rank=0, world_size=9)


def test_a_reshuffle_changes_the_window_and_only_the_window() -> None:
    plain = sampler()
    reshuffled = sampler(ledger=DataLedger().with_entry("reshuffle", 4, 7))
    for step in range(1, 15):
        before, after = plain.global_indices(step), reshuffled.global_indices(step)
        if 4 <= step < 7:
            assert after != before
            assert len(set(after)) == BATCH
            assert all(0 <= i < NUM_SAMPLES for i in after)
        else:
            assert after == before


def test_a_reshuffled_window_is_reproducible_and_salted() -> None:
    once = DataLedger().with_entry("reshuffle", 4, 7)
    twice = once.with_entry("reshuffle", 4, 7)  # a second rewind over the same window
    assert sampler(ledger=once).global_indices(5) == sampler(ledger=once).global_indices(5)
    assert sampler(ledger=twice).global_indices(5) != sampler(ledger=once).global_indices(5)


def test_a_skip_shifts_later_steps_onto_later_data() -> None:
    plain = sampler()
    skipped = sampler(ledger=DataLedger().with_entry("skip", 4, 7))
    for step in range(1, 4):
        assert skipped.global_indices(step) == plain.global_indices(step)
    for step in range(4, 15):
        assert skipped.global_indices(step) == plain.global_indices(step + 3)


def test_the_ledger_is_read_at_each_call() -> None:
    ledger = [DataLedger()]
    s = ElasticSampler(NUM_SAMPLES, global_batch_size=BATCH, ledger=lambda: ledger[0])
    before = s.global_indices(5)
    ledger[0] = DataLedger().with_entry("skip", 1, 2)
    assert s.global_indices(5) == sampler().global_indices(6) != before


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"global_batch_size": 0}, "global_batch_size"),
        ({"global_batch_size": NUM_SAMPLES + 1}, "global_batch_size"),
        ({"global_batch_size": 3, "world_size": 4}, "global_batch_size"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict[str, int], named: str) -> None:
    args = {"num_samples": NUM_SAMPLES, "global_batch_size": BATCH} | kwargs
    num_samples = args.pop("num_samples")
    with pytest.raises(ValueError, match=named):
        ElasticSampler(num_samples, **args)


@pytest.mark.parametrize("step", [0, -3])
def test_steps_count_from_one(step: int) -> None:
    with pytest.raises(ValueError, match="step"):
        sampler().global_indices(step)
