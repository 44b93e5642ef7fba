"""Checkpoint items streamed past in pieces (elastic/checkpoint/streamed.py)."""

from __future__ import annotations

import io
import struct

import pytest
import torch

from elastic.checkpoint.errors import CheckpointError
from elastic.checkpoint.in_place import NotInPlace
from elastic.checkpoint.streamed import (
    HEAD_LIMIT_BYTES,
    Destination,
    ItemStream,
    StorageLayout,
    parse_head,
    storage_layout,
)


def _saved(value: object) -> bytes:
    stream = io.BytesIO()
    torch.save(value, stream)
    return stream.getvalue()


class _Sink:
    """Records what an item stream delivers; its destinations are given by ``plan``."""

    def __init__(self, plan: object = None) -> None:
        self._plan = plan
        self.layout: StorageLayout | None = None
        self.targets: list[torch.Tensor] = []
        self.streamed_calls = 0
        self.blob: bytes | None = None

    def destinations(self, layout: StorageLayout) -> list[Destination]:
        self.layout = layout
        if self._plan is None:
            raise NotInPlace("this sink wants items whole")
        start, count = self._plan if isinstance(self._plan, tuple) else (0, layout.payload_bytes)
        target = torch.zeros(count, dtype=torch.uint8)
        self.targets.append(target)
        return [Destination(start, target)]

    def streamed(self) -> None:
        self.streamed_calls += 1

    def whole(self, blob: memoryview) -> None:
        self.blob = bytes(blob)


def _stream(blob: bytes, sink: _Sink, *, piece: int, streamable: bool = True) -> None:
    item = ItemStream(1000, len(blob), sink, streamable=streamable)
    view = memoryview(bytearray(blob))
    for at in range(0, len(blob), piece):
        item.feed(view[at : at + piece])
    item.finish()


TENSORS = [
    torch.arange(12, dtype=torch.float32).reshape(3, 4),
    torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    torch.arange(5, dtype=torch.int64),
    torch.tensor(3.5, dtype=torch.bfloat16),
    torch.zeros(0, 5),
    torch.tensor([True, False, True]),
    torch.randn(300, 257, dtype=torch.float64),
]
IDS = ["matrix", "transposed", "int64", "bf16-scalar", "empty", "bool", "large-f64"]


@pytest.mark.parametrize("tensor", TENSORS, ids=IDS)
def test_the_head_gives_the_saved_layout_once_it_reaches_the_storage_record(
    tensor: torch.Tensor,
) -> None:
    blob = _saved(tensor)
    heads = [parse_head(blob[:n]) for n in range(0, 1200, 37)]
    first = next(i for i, h in enumerate(heads) if h is not None)
    assert all(h is None for h in heads[:first]) and all(h is not None for h in heads[first:])
    head = parse_head(blob)
    assert head is not None and "data.pkl" in head.records
    layout = storage_layout(head)
    assert layout.tensor.device.type == "meta" and layout.tensor.dtype == tensor.dtype
    assert layout.tensor.shape == tensor.shape and layout.tensor.stride() == tensor.stride()
    size = layout.payload_bytes
    assert size == tensor.untyped_storage().nbytes()
    record = blob[head.payload_start : head.payload_start + size]
    assert record == bytes(tensor.untyped_storage())


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 30], ids=["1", "7", "4096", "whole"])
@pytest.mark.parametrize("tensor", TENSORS, ids=IDS)
def test_the_storage_record_reaches_its_destination_in_pieces_of_any_size(
    tensor: torch.Tensor, piece: int
) -> None:
    sink = _Sink(plan="all")
    _stream(_saved(tensor), sink, piece=piece)
    assert sink.blob is None and sink.streamed_calls == 1
    assert bytes(sink.targets[0].numpy()) == bytes(tensor.untyped_storage())


def test_a_destination_gets_exactly_its_part_of_the_record() -> None:
    tensor = torch.arange(4096, dtype=torch.int32)
    sink = _Sink(plan=(400, 1000))
    _stream(_saved(tensor), sink, piece=333)
    assert bytes(sink.targets[0].numpy()) == bytes(tensor.untyped_storage())[400:1400]


@pytest.mark.parametrize("reason", ["sink-refuses", "not-streamable", "not-a-tensor", "no-zip"])
def test_an_item_that_cannot_stream_is_handed_over_whole_and_exact(reason: str) -> None:
    blob = _saved({"a": torch.ones(3)} if reason == "not-a-tensor" else torch.ones(300))
    if reason == "no-zip":
        blob = b"not a zip archive at all" + blob
    sink = _Sink(plan=None if reason == "sink-refuses" else "all")
    _stream(blob, sink, piece=100, streamable=reason != "not-streamable")
    assert sink.blob == blob and sink.streamed_calls == 0


def test_an_item_whose_storage_record_never_starts_is_gathered_after_the_head_limit() -> None:
    pickled = _saved(torch.ones(2))
    blob = pickled[:40] + bytes(HEAD_LIMIT_BYTES + 10)  # a header that never ends
    sink = _Sink(plan="all")
    _stream(blob, sink, piece=1 << 16)
    assert sink.blob == blob


def test_a_record_that_does_not_end_where_data_pkl_says_is_an_error_not_a_silent_load() -> None:
    tensor = torch.arange(64, dtype=torch.float32)
    blob = bytearray(_saved(tensor))
    head = parse_head(bytes(blob))
    assert head is not None
    end = head.payload_start + 256
    assert blob[end : end + 4] == b"PK\x07\x08"
    struct.pack_into("<II", blob, end + 8, 255, 255)  # the descriptor states another size
    with pytest.raises(CheckpointError, match="does not end after 256 bytes"):
        _stream(bytes(blob), _Sink(plan="all"), piece=64)


def test_feeding_past_the_item_or_finishing_early_is_an_error() -> None:
    blob = _saved(torch.ones(8))
    item = ItemStream(0, len(blob), _Sink(plan="all"), streamable=True)
    with pytest.raises(CheckpointError, match="fed past"):
        item.feed(memoryview(bytearray(blob + b"x")))
    item = ItemStream(0, len(blob), _Sink(plan="all"), streamable=True)
    item.feed(memoryview(bytearray(blob[:-1])))
    with pytest.raises(CheckpointError, match="bytes read"):
        item.finish()
