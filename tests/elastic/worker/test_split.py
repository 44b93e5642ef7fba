"""BatchSplit: a fixed global batch over any world size, in equal numbers of micro-batches."""

from __future__ import annotations

import pytest

from elastic.worker.split import BatchSplit, split_sizes, unworkable_world_sizes

CASES = [
    (num_samples, world_size, micro)
    for num_samples in (1, 2, 3, 7, 20, 24, 1024)
    for world_size in (1, 2, 3, 4, 7, 24)
    for micro in (1, 2, 4, 5)
    if world_size <= num_samples
]


@pytest.mark.parametrize(("num_samples", "world_size", "micro"), CASES)
def test_every_sample_is_in_exactly_one_micro_batch_in_global_order(
    num_samples: int, world_size: int, micro: int
) -> None:
    split = BatchSplit(num_samples, world_size, micro)
    positions = [p for rank in range(world_size) for part in split.micro_slices(rank) for p in part]
    assert positions == list(range(num_samples))


@pytest.mark.parametrize(("num_samples", "world_size", "micro"), CASES)
def test_slices_differ_by_at_most_one_and_micro_counts_are_equal_across_ranks(
    num_samples: int, world_size: int, micro: int
) -> None:
    split = BatchSplit(num_samples, world_size, micro)
    sizes = [len(split.rank_slice(rank)) for rank in range(world_size)]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the first S % W ranks take one more
    counts = {len(split.micro_slices(rank)) for rank in range(world_size)}
    assert counts == {split.num_micro_batches}
    for rank in range(world_size):
        micro_sizes = [len(part) for part in split.micro_slices(rank)]
        assert max(micro_sizes) <= micro and max(micro_sizes) - min(micro_sizes) <= 1
        if micro > 1:  # padding micro-batches only ever come with micro-batches of one
            assert min(micro_sizes) >= 1


def test_an_even_split_keeps_full_micro_batches() -> None:
    split = BatchSplit(24, 3, 4)
    assert [len(p) for p in split.micro_slices(2)] == [4, 4]
    assert split.rank_slice(2) == range(16, 24)


def test_1024_samples_over_24_ranks_with_micro_4_split_unevenly() -> None:
    split = BatchSplit(1024, 24, 4)  # 3 nodes x 8 GPUs, the geometry
    assert [len(split.rank_slice(r)) for r in (0, 15, 16, 23)] == [43, 43, 42, 42]
    assert split.num_micro_batches == 11
    assert [len(p) for p in split.micro_slices(23)] == [4] * 9 + [3] * 2


def test_padding_micro_batches_appear_only_where_a_slice_is_shorter_than_the_count() -> None:
    split = BatchSplit(10, 4, 1)  # slices 3, 3, 2, 2; three micro-batches each
    assert [len(p) for p in split.micro_slices(0)] == [1, 1, 1]
    assert [len(p) for p in split.micro_slices(3)] == [1, 1, 0]


def test_split_sizes_gives_the_remainder_to_the_first_holders() -> None:
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(0, 2) == [0, 0]
    with pytest.raises(ValueError, match="parts=0"):
        split_sizes(3, 0)


def test_world_sizes_larger_than_the_batch_cannot_work() -> None:
    assert unworkable_world_sizes(20, range(8, 33, 8)) == [24, 32]
    with pytest.raises(ValueError, match="world_size=0"):
        BatchSplit(4, 0, 1)
    with pytest.raises(ValueError, match="rank=3"):
        BatchSplit(4, 3, 1).rank_slice(3)
