"""Job documents for tests and benchmarks that run ``python -m model.train`` directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SEQ_LEN = 32
"""Tokens per sample of the tiny jobs."""


def with_overrides(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with each override merged into its section (dicts) or replacing it."""
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(doc.get(section), dict):
            doc[section] = {**doc[section], **values}
        else:
            doc[section] = values
    return doc


def train_job(
    base: Path, demo: Path, *, run_id: str, steps: int = 200, **overrides: Any
) -> dict[str, Any]:
    """A pre-LN tiny model on 8 x 32 tokens per step, run and checkpoint dirs under ``base``."""
    doc: dict[str, Any] = {
        "run_id": run_id,
        "run_dir": str(base / "run"),
        "checkpoint": {"url": str(base / "ckpt"), "interval_steps": 100, "keep_last": 3},
        "model": {"size": "tiny", "max_seq_len": SEQ_LEN},
        "data": {"demo_dir": str(demo), "eval_every_steps": 0},
        "train": {
            "steps": steps,
            "global_batch_tokens": 8 * SEQ_LEN,
            "micro_batch_size": 4,
            "seq_len": SEQ_LEN,
            "warmup_steps": 10,
            "threads": 1,
        },
    }
    return with_overrides(doc, overrides)
