"""Tensors read in place from a checkpoint file's checked bytes, without ``torch.load``'s copy.

DCP stores every tensor item as a small ``torch.save`` archive (a zip of stored, uncompressed
records: ``data.pkl`` with dtype, shape and strides, ``data/<key>`` with the raw bytes).
``torch.load`` on such a slice allocates fresh memory for each storage and copies the bytes
into it, only for DCP to copy them again into the tensor being loaded: a second copy of the
whole state, and a page fault per 4 KiB of fresh memory (about as much time again as the copy).
The load path here already holds each file in memory, checked against the manifest
(``integrity.py``), so :func:`tensor_in_place` instead returns a tensor that *views* those
bytes; the caller copies it once, into its destination.

Only what ``torch.load(weights_only=True)`` accepts is accepted: ``data.pkl`` goes through
torch's restricted unpickler (the bytes were authenticated before this runs, and even so no
arbitrary object can be built), with this module resolving the storage references to views.
Anything it does not recognise (another byte order, a storage shared between items, a record
outside the slice) raises :class:`NotInPlace`, and the caller falls back to ``torch.load``.
Uses two torch internals kept stable across releases because ``torch.load`` itself relies on
them: ``torch._C.PyTorchFileReader`` (record offsets) and ``torch._weights_only_unpickler``.
"""

from __future__ import annotations

import io
import sys
from typing import IO, Any, cast

import torch
from torch import _weights_only_unpickler

from elastic.checkpoint.integrity import MemoryFile

__all__ = ["NotInPlace", "check_byte_order", "storage_reference", "tensor_in_place"]


class NotInPlace(Exception):
    """This item cannot be viewed in place; load it with ``torch.load`` instead."""


def tensor_in_place(blob: memoryview) -> torch.Tensor:
    """The tensor serialised (``torch.save``) in ``blob``, as a view of ``blob``'s memory.

    ``blob`` must stay alive and unchanged while the tensor is used. Raises
    :class:`NotInPlace` for anything but one plain tensor in little-endian byte order.
    """
    try:
        reader = torch._C.PyTorchFileReader(cast(IO[bytes], MemoryFile(blob)))
        records = set(reader.get_all_records())
        check_byte_order(
            {"byteorder": reader.get_record("byteorder")} if "byteorder" in records else {}
        )
        unpickler = _weights_only_unpickler.Unpickler(
            io.BytesIO(reader.get_record("data.pkl")), encoding="utf-8"
        )
        unpickler.persistent_load = _StorageViews(reader, records, blob)  # type: ignore[method-assign]
        result = unpickler.load()
    except NotInPlace:
        raise
    except Exception as exc:  # any surprise: torch.load decides instead
        raise NotInPlace(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(result, torch.Tensor) or type(result) is not torch.Tensor:
        raise NotInPlace(f"not a plain tensor: {type(result).__name__}")
    return result


def storage_reference(saved_id: Any) -> tuple[str, torch.dtype, int]:
    """The record key, dtype and size in bytes of a ``data.pkl`` storage reference; raises
    :class:`NotInPlace` for anything but ``("storage", <storage type>, key, location, numel)``."""
    if not (isinstance(saved_id, tuple) and len(saved_id) == 5):
        raise NotInPlace(f"storage reference {saved_id!r}")
    kind, storage_type, key, _location, numel = saved_id
    if kind not in ("storage", b"storage") or not isinstance(numel, int) or numel < 0:
        raise NotInPlace(f"storage reference {saved_id!r}")
    key = key.decode() if isinstance(key, bytes) else str(key)
    dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
    return key, dtype, numel * torch._utils._element_size(dtype)


def check_byte_order(records: Any) -> None:
    """Raise :class:`NotInPlace` unless ``records`` (name -> bytes) say this machine's order."""
    order = bytes(records["byteorder"]) if "byteorder" in records else b"little"
    if order.decode(errors="replace") != sys.byteorder:
        raise NotInPlace(f"byte order {order!r}")


class _StorageViews:
    """``persistent_load`` for ``data.pkl``: each storage reference becomes a view of its
    record's bytes inside the blob (each record used once)."""

    def __init__(self, reader: Any, records: set[str], blob: memoryview) -> None:
        self._reader = reader
        self._records = records
        self._blob = blob
        self._used: set[str] = set()

    def __call__(self, saved_id: Any) -> torch.storage.TypedStorage:
        key, dtype, size_bytes = storage_reference(saved_id)
        name = f"data/{key}"
        if name not in self._records or name in self._used:
            raise NotInPlace(f"record {name} missing or shared")
        self._used.add(name)
        if self._reader.get_record_size(name) != size_bytes:
            raise NotInPlace(f"record {name}: size does not match {size_bytes} bytes of {dtype}")
        start = int(self._reader.get_record_offset(name))
        if start < 0 or start + size_bytes > len(self._blob):
            raise NotInPlace(f"record {name} outside the item")
        untyped = (
            torch.frombuffer(
                self._blob[start : start + size_bytes], dtype=torch.uint8
            ).untyped_storage()
            if size_bytes
            else torch.UntypedStorage(0)
        )
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
