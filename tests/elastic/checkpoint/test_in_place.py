"""Tensors viewed in place from checked checkpoint bytes (elastic/checkpoint/in_place.py)."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from elastic.checkpoint.in_place import NotInPlace, tensor_in_place


def _saved(value: object, *, prefix: bytes = b"") -> memoryview:
    """``value`` as ``torch.save`` writes it, after ``prefix`` (an item deep inside a file),
    in writable memory like the reader's."""
    stream = io.BytesIO()
    torch.save(value, stream)
    return memoryview(bytearray(prefix + stream.getvalue()))[len(prefix) :]


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(12, dtype=torch.float32).reshape(3, 4),
        torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # strides kept
        torch.arange(5, dtype=torch.int64),
        torch.tensor(3.5, dtype=torch.bfloat16),
        torch.zeros(0, 5),
        torch.tensor([True, False]),
    ],
    ids=["matrix", "transposed", "int64", "bf16-scalar", "empty", "bool"],
)
def test_a_saved_tensor_comes_back_equal_with_its_layout(tensor: torch.Tensor) -> None:
    loaded = tensor_in_place(_saved(tensor, prefix=b"odd offset"))
    assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
    assert loaded.stride() == tensor.stride() and torch.equal(loaded, tensor)


def test_the_tensor_views_the_blob_and_copies_nothing() -> None:
    blob = _saved(torch.ones(1024))
    loaded = tensor_in_place(blob)
    start = torch.frombuffer(blob, dtype=torch.uint8).data_ptr()
    assert start <= loaded.data_ptr() < start + len(blob)
    loaded.fill_(7.0)  # writes through to the blob: the same memory
    assert torch.equal(tensor_in_place(blob), torch.full((1024,), 7.0))


@pytest.mark.parametrize(
    "value", [{"a": torch.ones(2)}, [torch.ones(2)], 3, torch.nn.Parameter(torch.ones(2))]
)
def test_anything_but_one_plain_tensor_is_left_to_torch_load(value: object) -> None:
    with pytest.raises(NotInPlace):
        tensor_in_place(_saved(value))


def test_a_record_that_does_not_fit_its_declared_size_is_left_to_torch_load() -> None:
    blob = _saved(torch.ones(4))
    cut = memoryview(bytes(blob[: len(blob) // 2]))
    with pytest.raises(NotInPlace):
        tensor_in_place(cut)


def test_a_big_endian_archive_is_left_to_torch_load() -> None:
    source = zipfile.ZipFile(io.BytesIO(bytes(_saved(torch.ones(4)))))
    rewritten = io.BytesIO()
    with zipfile.ZipFile(rewritten, "w", compression=zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info)
            out.writestr(info, b"big" if info.filename.endswith("/byteorder") else data)
    with pytest.raises(NotInPlace, match="byte order"):
        tensor_in_place(memoryview(bytearray(rewritten.getvalue())))
