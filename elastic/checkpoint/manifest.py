"""The manifest: the commit record of one checkpoint, written last into its step directory.

A step directory is a checkpoint exactly when it holds a ``manifest.json`` that parses. The
manifest lists every DCP file with its size so a reader can tell a complete checkpoint from a
torn or truncated one without opening the shards, and carries the trainer's own ``meta``
(data position, skip ledger, guard state, config fingerprint) as plain JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from elastic.checkpoint.errors import CheckpointCorrupt

__all__ = ["FORMAT_VERSION", "Manifest"]

FORMAT_VERSION = 1
_REQUIRED = ("step", "world_size", "time_unix", "files")


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
    format_version: int = FORMAT_VERSION

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
            self.format_version == FORMAT_VERSION,
            "format_version",
            self.format_version,
            f"{FORMAT_VERSION} (this build reads no other)",
        )

    @property
    def size_bytes(self) -> int:
        return sum(self.files.values())

    def with_known_good(self) -> Manifest:
        return replace(self, known_good=True)

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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, key: str, value: object, requirement: str) -> None:
    if not condition:
        raise ValueError(f"{key}={value!r}: must be {requirement}")
