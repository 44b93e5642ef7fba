"""``checkpoint`` section of the YAML config: where checkpoints go and how often.

``url`` is any fsspec URL (``file://``, ``s3://``, ``memory://``...); a plain path means local
disk. ``storage_options`` is passed to fsspec unchanged (``endpoint_url``, ``key``, ``secret``
for S3-compatible stores). The YAML key for ``async_save`` is ``async`` (a Python keyword).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from elastic.config import check


@dataclass(frozen=True)
class CheckpointConfig:
    """How and where training state is checkpointed."""

    url: str = "file://./runs/checkpoints"
    """Root URL; checkpoints live under ``<url>/<run_id>/step-<N>/``."""
    interval_steps: int = 50
    """Commit a checkpoint every this many optimizer steps (> 0)."""
    keep_last: int = 4
    """Committed checkpoints kept by retention (>= 2; the newest known-good is kept on top)."""
    async_save: bool = field(default=False, metadata={"key": "async"})
    """Write in the background (DCP async_save); the manifest lands when the write completes."""
    background_nice: int = 19
    """Niceness (0-19, Linux) of the threads that plan and write an async save: above the
    trainer's, so the write takes idle CPU time before time from training. 0: same priority."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the fsspec filesystem (e.g. ``endpoint_url``, ``key``, ``secret``)."""

    def __post_init__(self) -> None:
        check(bool(self.url.strip()), "url", self.url, "must not be empty")
        check(self.interval_steps > 0, "interval_steps", self.interval_steps, "must be > 0")
        check(self.keep_last >= 2, "keep_last", self.keep_last, "must be >= 2")
        check(
            0 <= self.background_nice <= 19,
            "background_nice",
            self.background_nice,
            "must be in 0..19",
        )
