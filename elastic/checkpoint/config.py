"""``checkpoint`` section of the YAML config: where checkpoints go and how often.

``url`` is any fsspec URL (``file://``, ``s3://``, ``memory://``...); a plain path means local
disk. ``storage_options`` is passed to fsspec unchanged (``endpoint_url``, ``key``, ``secret``
for S3-compatible stores). The YAML key for ``async_save`` is ``async`` (a Python keyword).

``signing_key_file`` is read when the config is built, so a missing, unreadable or empty key
fails at start with one line naming the key (exit code 2), on every node that builds the
config (``elasticctl --config`` too: listing signed checkpoints needs the key; ``--url``
does not). The key stays out of ``repr``, equality and the resolved config written to disk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from elastic.checkpoint.signing import read_signing_key
from elastic.checkpoint.storage import storage_protocol_problem
from elastic.config import check, check_regular_file


@dataclass(frozen=True)
class CheckpointConfig:
    """How and where training state is checkpointed."""

    url: str = "file://./runs/checkpoints"
    """Root URL; checkpoints live under ``<url>/<run_id>/step-<N>/``."""
    interval_steps: int = 50
    """Commit a checkpoint every this many optimizer steps (> 0)."""
    keep_last: int = 4
    """Newest committed checkpoints kept by retention (>= 1). On top, retention keeps every
    checkpoint a divergence rewind may still load (docs/checkpoints.md), so any value works
    with any ``interval_steps``."""
    async_save: bool = field(default=False, metadata={"key": "async"})
    """Write in the background (DCP async_save); the manifest lands when the write completes."""
    background_nice: int = 19
    """Niceness (0-19, Linux) of the threads that plan and write an async save: above the
    trainer's, so the write takes idle CPU time before time from training. 0: same priority."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the fsspec filesystem (e.g. ``endpoint_url``, ``key``, ``secret``)."""
    signing_key_file: str | None = None
    """File holding a secret key (>= 16 bytes): every save signs its manifest with it (HMAC),
    and a checkpoint without a valid signature is never loaded. ``None``: no signing."""

    def __post_init__(self) -> None:
        check(bool(self.url.strip()), "url", self.url, "must not be empty")
        problem = storage_protocol_problem(self.url)
        check(problem is None, "url", self.url, problem or "")
        check(self.interval_steps > 0, "interval_steps", self.interval_steps, "must be > 0")
        check(self.keep_last >= 1, "keep_last", self.keep_last, "must be >= 1")
        check(
            0 <= self.background_nice <= 19,
            "background_nice",
            self.background_nice,
            "must be in 0..19",
        )
        if self.signing_key_file is not None:
            # Stat before reading: a FIFO would block the read, a device never end.
            check_regular_file("checkpoint.signing_key_file", self.signing_key_file)
            try:
                self.signing_key  # noqa: B018 (read once, here: a bad key fails at start)
            except ValueError as exc:
                check(False, "signing_key_file", self.signing_key_file, str(exc))

    @functools.cached_property
    def signing_key(self) -> bytes | None:
        """The key from ``signing_key_file`` (read once per config), ``None`` without one."""
        if self.signing_key_file is None:
            return None
        return read_signing_key(self.signing_key_file)
