"""The manifest: the commit record of one checkpoint, written last into its step directory.

A step directory is a checkpoint exactly when it holds a ``manifest.json`` that parses. The
manifest lists every DCP file with its size and its BLAKE3, so a reader can tell a complete
checkpoint from a torn or truncated one without opening the shards, and a changed byte from
the bytes that were written before deserialising any of them; it carries the trainer's own
``meta`` (data position, skip ledger, guard state, config fingerprint) as plain JSON. It is
only ever parsed as JSON.

Format versions: 1 lists sizes only (read, never written); 2 adds ``blake3`` (one digest per
listed file) and ``signature``, the HMAC-SHA256 of :meth:`Manifest.payload` (the canonical JSON
of every other field) when the writer had a signing key (``None`` otherwise); 3 (written) adds
``chunk_bytes`` and ``chunks``, the BLAKE3 of each ``chunk_bytes`` chunk of every listed file,
so a load checks and uses a file a chunk at a time (``streamed.py``). Versions 1 and 2 are still
read; builds before format 3 refuse a format-3 manifest as unreadable.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from elastic.checkpoint.errors import CheckpointCorrupt
from elastic.checkpoint.signing import sign, signature_problem

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "Manifest"]

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MAX_CHUNK_BYTES = 1 << 30
_REQUIRED = ("step", "world_size", "time_unix", "files")
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Manifest:
    """What was committed at ``step`` by ``world_size`` ranks, and which files make it up."""

    step: int
    world_size: int
    time_unix: float
    files: dict[str, int]
    """Relative path inside the step directory -> size_bytes."""
    known_good: bool = False
    """Set by the trainer once training went on healthily past this step (rewind targets)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Trainer state that is not tensors; must be JSON-serialisable."""
    blake3: dict[str, str] = field(default_factory=dict)
    """Relative path -> BLAKE3 of the file (hex), for exactly the ``files`` (format 2)."""
    signature: str | None = None
    """HMAC-SHA256 (hex) of :meth:`payload` under the writer's signing key; ``None``: unsigned."""
    format_version: int = FORMAT_VERSION
    chunk_bytes: int = 0
    """Bytes per digest chunk (format 3; 0 in formats 1 and 2)."""
    chunks: dict[str, list[str]] = field(default_factory=dict)
    """Relative path -> BLAKE3 (hex) of each ``chunk_bytes`` chunk of the file, in order, for
    exactly the ``files`` (format 3)."""

    def __post_init__(self) -> None:
        _require(_is_int(self.step) and self.step >= 0, "step", self.step, "an integer >= 0")
        _require(
            _is_int(self.world_size) and self.world_size > 0,
            "world_size",
            self.world_size,
            "an integer > 0",
        )
        _require(
            isinstance(self.time_unix, int | float) and math.isfinite(self.time_unix),
            "time_unix",
            self.time_unix,
            "a finite number",
        )
        _require(isinstance(self.files, dict), "files", self.files, "a mapping")
        for name, size in self.files.items():
            _require(isinstance(name, str) and bool(name), "files", name, "non-empty names")
            _require(_is_int(size) and size >= 0, f"files[{name}]", size, "a size >= 0")
        _require(isinstance(self.known_good, bool), "known_good", self.known_good, "a bool")
        _require(isinstance(self.meta, dict), "meta", self.meta, "a mapping")
        _require(
            self.format_version in READABLE_VERSIONS,
            "format_version",
            self.format_version,
            f"one of {READABLE_VERSIONS} (this build reads no other)",
        )
        self._check_digests()
        if self.signature is not None:
            _require(_is_hex(self.signature, 64), "signature", self.signature, "64 hex digits")

    def _check_digests(self) -> None:
        _require(isinstance(self.blake3, dict), "blake3", self.blake3, "a mapping")
        listed = set(self.files) if self.format_version >= 2 else set()
        _require(
            set(self.blake3) == listed,
            "blake3",
            sorted(set(self.blake3) ^ listed),
            "one digest per listed file (format 2), none in format 1",
        )
        for name, digest in self.blake3.items():
            _require(_is_hex(digest, 64), f"blake3[{name}]", digest, "64 hex digits")
        self._check_chunks()

    def _check_chunks(self) -> None:
        chunked = self.format_version >= 3
        lowest = 1 if chunked and self.files else 0
        _require(
            _is_int(self.chunk_bytes)
            and lowest <= self.chunk_bytes <= (MAX_CHUNK_BYTES if chunked else 0),
            "chunk_bytes",
            self.chunk_bytes,
            f"in 1..{MAX_CHUNK_BYTES} (format 3 listing files), 0 before",
        )
        _require(isinstance(self.chunks, dict), "chunks", self.chunks, "a mapping")
        listed = set(self.files) if chunked else set()
        _require(
            set(self.chunks) == listed,
            "chunks",
            sorted(set(self.chunks) ^ listed),
            "one list per listed file (format 3), none before",
        )
        for name, digests in self.chunks.items():
            count = -(-self.files[name] // self.chunk_bytes)
            _require(
                isinstance(digests, list)
                and len(digests) == count
                and all(_is_hex(d, 64) for d in digests),
                f"chunks[{name}]",
                digests if not isinstance(digests, list) else f"{len(digests)} entries",
                f"{count} digests of 64 hex digits ({self.files[name]} bytes)",
            )

    @property
    def size_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def has_digests(self) -> bool:
        return self.format_version >= 2

    @property
    def has_chunks(self) -> bool:
        return self.format_version >= 3

    def with_known_good(self) -> Manifest:
        """The same checkpoint flagged known-good; unsigned (the caller signs it again)."""
        return replace(self, known_good=True, signature=None)

    def payload(self) -> bytes:
        """What the signature covers: compact, key-sorted JSON of every field but itself."""
        fields = {k: v for k, v in asdict(self).items() if k != "signature"}
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    def signed(self, key: bytes) -> Manifest:
        return replace(self, signature=sign(self.payload(), key))

    def signature_problem(self, key: bytes) -> str | None:
        """Why this manifest's signature does not hold under ``key`` (``None``: it holds)."""
        return signature_problem(self.payload(), self.signature, key)

    def to_json(self) -> str:
        """Deterministic JSON; ``ValueError`` when ``meta`` is not JSON-serialisable."""
        try:
            return json.dumps(asdict(self), sort_keys=True, indent=1, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise ValueError(f"manifest for step {self.step} is not valid JSON: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate; anything unexpected raises :class:`CheckpointCorrupt`."""
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointCorrupt(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointCorrupt(f"manifest must be a JSON object, got {type(data).__name__}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise CheckpointCorrupt(f"manifest lacks {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointCorrupt(f"manifest has unknown keys {', '.join(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise CheckpointCorrupt(f"manifest is invalid: {exc}") from exc


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, key: str, value: object, requirement: str) -> None:
    if not condition:
        raise ValueError(f"{key}={value!r}: must be {requirement}")
