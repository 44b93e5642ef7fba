"""Checkpoint items streamed past a chunk at a time, tensors copied straight into place.

A format-3 manifest lists the BLAKE3 of each chunk of every file (``integrity.py``), so a
load reads a file through one small reused buffer, checks each chunk, and uses it before
reading the next (:func:`~elastic.checkpoint.integrity.verified_chunks`). Holding the whole
file in fresh memory instead (format 2) costs a page fault per page touched, which on a VM
took longer than reading the file: the load reached 0.64x of a raw read.

DCP stores each tensor item as a small ``torch.save`` archive: a zip of stored records,
written in streaming mode (local headers without sizes, a data descriptor after each record):
``data.pkl`` (dtype, shape, strides and the storage's key), a few small records (byte order,
format version, alignment), ``data/<key>`` (the storage's raw bytes), then the central
directory. :class:`ItemStream` follows one item's bytes as they go by. It keeps the head, up
to the storage record's first byte; reads ``data.pkl`` through torch's restricted unpickler
with the storage made on the ``meta`` device, so it learns the tensor's layout without
memory; asks its :class:`ItemSink` where each destination's bytes lie in the record; copies
the record's bytes into the destinations as the chunks arrive; and checks the descriptor after
the record (the record ended where ``data.pkl`` said). Anything else (small items, non-tensor
items, a destination of another dtype or not contiguous, a head it does not recognise) is
gathered whole and handed to the sink, which loads it as format 2 does.

Every byte used was checked first, as before; what changes is that a load that fails on a
later chunk has already filled some tensors from earlier, checked chunks. The manager then
falls back to an older checkpoint, which fills them all again, or fails the load: a partly
loaded state is never trained from.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import _weights_only_unpickler

from elastic.checkpoint.errors import CheckpointError
from elastic.checkpoint.in_place import NotInPlace, check_byte_order, storage_reference

__all__ = [
    "HEAD_LIMIT_BYTES",
    "STREAM_MIN_BYTES",
    "Destination",
    "Head",
    "ItemSink",
    "ItemStream",
    "StorageLayout",
    "parse_head",
    "storage_layout",
]

HEAD_LIMIT_BYTES = 1 << 20
"""An item whose storage record has not begun within this many bytes is gathered whole."""
HEAD_STEP_BYTES = 1 << 12
"""Bytes added to a head at a time before trying to parse it (a head is ~700 bytes)."""
STREAM_MIN_BYTES = 1 << 16
"""Tensor items smaller than this are gathered whole (the copy saved is not worth a head)."""

_LOCAL_HEADER = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_LOCAL_HEADER_BYTES = 30
_HAS_DESCRIPTOR = 0x08
_ZIP64_EXTRA = 0x0001
_UNKNOWN_32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Head:
    """An item's records before its storage record, and where that record's bytes begin."""

    records: Mapping[str, bytes]
    """Record name inside the archive (``data.pkl``, ``byteorder``...) -> its bytes."""
    key: str
    """The storage record's key: its name is ``<archive>/data/<key>``."""
    payload_start: int
    """Offset in the item of the storage record's first byte."""
    payload_bytes: int | None
    """The record's size from its local header; ``None`` when a descriptor follows it."""


@dataclass(frozen=True)
class StorageLayout:
    """What ``data.pkl`` says about the item's one storage."""

    tensor: torch.Tensor
    """The saved tensor on the ``meta`` device: its dtype, shape, strides and offset."""
    payload_bytes: int
    """The storage record's size (numel x element size)."""


@dataclass(frozen=True)
class Destination:
    """Where bytes ``start .. start + target.numel()`` of the storage record go."""

    start: int
    target: torch.Tensor
    """A one-dimensional ``uint8`` view of the destination tensor's memory."""


class ItemSink(Protocol):
    """What an :class:`ItemStream` delivers an item to."""

    def destinations(self, layout: StorageLayout) -> list[Destination]:
        """Where the record's bytes go; raise :class:`NotInPlace` to get the item whole."""
        ...

    def streamed(self) -> None:
        """Every destination has all its bytes."""
        ...

    def whole(self, blob: memoryview) -> None:
        """The item's checked bytes, gathered (valid during the call only)."""
        ...


class ItemStream:
    """One item (``length`` bytes at ``offset`` in its file) as its bytes go by, in order."""

    def __init__(self, offset: int, length: int, sink: ItemSink, *, streamable: bool) -> None:
        self.offset = offset
        self.end = offset + length
        self._length = length
        self._sink = sink
        self._received = 0
        self._head: bytearray | None = bytearray() if streamable else None
        self._whole: bytearray | None = None if streamable else bytearray(length)
        self._destinations: list[Destination] = []
        self._payload = (0, 0)  # start, end in the item
        self._descriptor = False
        self._tail = bytearray()

    def feed(self, data: memoryview) -> None:
        """The item's next ``len(data)`` bytes (checked); used before this returns."""
        start = self._received
        if start + data.nbytes > self._length:
            raise CheckpointError(f"item at byte {self.offset}: fed past its {self._length} bytes")
        while self._head is not None and data.nbytes:  # a little at a time: no big copy
            step = data[:HEAD_STEP_BYTES]
            self._head += step
            self._received += step.nbytes
            data = data[step.nbytes :]
            self._try_head()
        start = self._received
        self._received += data.nbytes
        if self._whole is not None:
            self._whole[start : self._received] = data
        elif data.nbytes:
            self._copy(start, data)

    def finish(self) -> None:
        """All bytes fed: deliver the item."""
        if self._received != self._length:
            raise CheckpointError(
                f"item at byte {self.offset}: {self._received} of {self._length} bytes read"
            )
        if self._head is not None:  # never reached its storage record: gather it after all
            self._gather()
        if self._whole is not None:
            self._sink.whole(memoryview(self._whole))
            return
        self._check_descriptor()
        self._sink.streamed()

    def _try_head(self) -> None:
        assert self._head is not None
        try:
            head = parse_head(self._head)
            if head is None:
                if len(self._head) > HEAD_LIMIT_BYTES:
                    raise NotInPlace(f"no storage record in the first {HEAD_LIMIT_BYTES} bytes")
                return
            layout = storage_layout(head)
            end = head.payload_start + layout.payload_bytes
            if head.payload_bytes not in (None, layout.payload_bytes) or end > self._length:
                raise NotInPlace(f"storage record of {head.payload_bytes} bytes")
            destinations = self._sink.destinations(layout)
        except NotInPlace:
            self._gather()
            return
        received, self._head = self._head, None
        self._destinations = destinations
        self._payload = (head.payload_start, end)
        self._descriptor = head.payload_bytes is None
        self._copy(head.payload_start, memoryview(received)[head.payload_start :])

    def _gather(self) -> None:
        assert self._head is not None
        self._whole = bytearray(self._length)
        self._whole[: len(self._head)] = self._head
        self._head = None

    def _copy(self, start: int, data: memoryview) -> None:
        """Bytes ``start ..`` of the item: those of the storage record into the destinations,
        the first ones after it kept for :meth:`_check_descriptor`."""
        first, end = self._payload
        lo, hi = max(start, first), min(start + data.nbytes, end)
        if hi > lo:
            source = torch.frombuffer(data[lo - start : hi - start], dtype=torch.uint8)
            for dest in self._destinations:
                a = max(lo - first, dest.start)
                b = min(hi - first, dest.start + dest.target.numel())
                if b > a:
                    offset = a - (lo - first)
                    dest.target[a - dest.start : b - dest.start].copy_(
                        source[offset : offset + b - a]
                    )
        after = max(start, end)
        if after < start + data.nbytes and len(self._tail) < 32:
            self._tail += data[after - start : after - start + 32 - len(self._tail)]

    def _check_descriptor(self) -> None:
        """The storage record ended where ``data.pkl`` said: its descriptor follows it."""
        size = self._payload[1] - self._payload[0]
        if not self._descriptor or _descriptor_size(bytes(self._tail), 0, size):
            return
        raise CheckpointError(
            f"item at byte {self.offset}: its storage record does not end after {size} bytes "
            "(a torch archive layout this build does not know; loaded from the wrong bytes)"
        )


def parse_head(head: bytes | bytearray) -> Head | None:
    """The records of a ``torch.save`` archive before its storage record, once ``head`` (the
    archive's first bytes) reaches that record's data; ``None`` while more bytes are needed.

    Raises :class:`NotInPlace` for anything but a zip of stored records.
    """
    records: dict[str, bytes] = {}
    position = 0
    while True:
        if len(head) < position + _LOCAL_HEADER_BYTES:
            return None
        if head[position : position + 4] != _LOCAL_HEADER:
            raise NotInPlace(f"no zip record at byte {position}")
        flags, method = struct.unpack_from("<HH", head, position + 6)
        (stored,) = struct.unpack_from("<I", head, position + 18)
        name_bytes, extra_bytes = struct.unpack_from("<HH", head, position + 26)
        data_start = position + _LOCAL_HEADER_BYTES + name_bytes + extra_bytes
        if method != 0:
            raise NotInPlace(f"compressed record (method {method})")
        if len(head) < data_start:
            return None
        name_at = position + _LOCAL_HEADER_BYTES
        try:
            name = bytes(head[name_at : name_at + name_bytes]).decode()
        except UnicodeDecodeError as exc:
            raise NotInPlace("record name is not UTF-8") from exc
        extra = bytes(head[name_at + name_bytes : data_start])
        size = None if flags & _HAS_DESCRIPTOR else _header_size(stored, extra)
        record = name.partition("/")[2]
        if record.startswith("data/"):
            return Head(
                records, key=record[len("data/") :], payload_start=data_start, payload_bytes=size
            )
        if size is None:
            found = _find_descriptor(head, data_start)
            if found is None:
                return None
            size, after = found
        else:
            if len(head) < data_start + size:
                return None
            after = data_start + size
        records[record] = bytes(head[data_start : data_start + size])
        position = after


def _header_size(stored: int, extra: bytes) -> int:
    """A record's size from its local header (and its zip64 extra field when it says so)."""
    if stored != _UNKNOWN_32:
        return stored
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        if kind == _ZIP64_EXTRA and length >= 8 and at + 4 + length <= len(extra):
            # the 64-bit sizes the header marks unknown, original size first; stored: equal
            return int(struct.unpack_from("<Q", extra, at + 4)[0])
        at += 4 + length
    raise NotInPlace("record size missing from its zip64 field")


def _find_descriptor(head: bytes | bytearray, data_start: int) -> tuple[int, int] | None:
    """``(size, end)`` of the record starting at ``data_start``, from the first descriptor
    after it that states exactly its length; ``None`` while more bytes are needed."""
    search = data_start
    while (at := head.find(_DESCRIPTOR, search)) >= 0:
        if len(head) < at + 28:
            return None
        length = _descriptor_size(bytes(head[at : at + 28]), 0, at - data_start)
        if length:
            return at - data_start, at + length
        search = at + 1
    return None


def _descriptor_size(data: bytes, at: int, size: int) -> int:
    """Bytes of the data descriptor at ``at`` when it describes a stored record of ``size``
    bytes (16, or 24 in zip64 form) and a zip signature follows it; 0 when it does not."""
    if data[at : at + 4] != _DESCRIPTOR:
        return 0
    short = len(data) >= at + 18 and struct.unpack_from("<II", data, at + 8) == (size, size)
    if short and data[at + 16 : at + 18] == b"PK":
        return 16
    long = len(data) >= at + 26 and struct.unpack_from("<QQ", data, at + 8) == (size, size)
    if long and data[at + 24 : at + 26] == b"PK":
        return 24
    return 0


def storage_layout(head: Head) -> StorageLayout:
    """The saved tensor's layout, from ``data.pkl`` through torch's restricted unpickler, its
    storage on the ``meta`` device. Raises :class:`NotInPlace` for anything but one plain
    tensor on the head's storage record, in this machine's byte order."""
    check_byte_order(head.records)
    pickled = head.records.get("data.pkl")
    if pickled is None:
        raise NotInPlace("no data.pkl before the storage record")
    storages = _MetaStorage(head.key)
    try:
        unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
        unpickler.persistent_load = storages  # type: ignore[method-assign]
        tensor = unpickler.load()
    except NotInPlace:
        raise
    except Exception as exc:  # any surprise: gathered whole, torch.load decides
        raise NotInPlace(f"{type(exc).__name__}: {exc}") from exc
    if type(tensor) is not torch.Tensor or storages.size_bytes is None:
        raise NotInPlace(f"not a plain tensor: {type(tensor).__name__}")
    return StorageLayout(tensor=tensor, payload_bytes=storages.size_bytes)


class _MetaStorage:
    """``persistent_load`` for ``data.pkl``: its one storage, on the ``meta`` device."""

    def __init__(self, key: str) -> None:
        self._key = key
        self.size_bytes: int | None = None

    def __call__(self, saved_id: Any) -> torch.storage.TypedStorage:
        key, dtype, size_bytes = storage_reference(saved_id)
        if key != self._key or self.size_bytes is not None:
            raise NotInPlace(f"storage {key} is not the item's one storage record")
        self.size_bytes = size_bytes
        untyped = torch.UntypedStorage(size_bytes, device="meta")
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
