"""YAML section ``data``: sources and their mixture weights, stages, seed, evaluation cadence.

Example (the shape of Gopher's MassiveText mixture)::

    data:
      sources:
        - {name: web,   url: s3://corpus/prepared/web,  weight: 0.48}
        - {name: books, url: /data/prepared,            weight: 0.27}   # holds books/
        - {name: news,  url: /data/prepared/news,       weight: 0.10}
        - {name: code,  url: /data/prepared/code,       weight: 0.03}
        - {name: wiki,  url: /data/prepared/wiki,       weight: 0.02}
      stages:
        - {start_step: 5000, weights: {web: 0.3, books: 0.4, wiki: 0.3}, seq_len: 512}
      seed: 1234

Rules (checked here, so a bad config fails before any worker starts):

- ``sources[i].url`` is a prepared shard directory of that source or the output directory of
  ``prepare-data`` holding ``<name>/``. Local paths (and ``file://``) must exist; object-store
  URLs are checked when the data is opened.
- Weights are relative (normalised to sum 1) and must be > 0 in ``sources``; stage weights may be
  0 and sources a stage does not list get weight 0 in that stage (a stage states its whole
  mixture). A stage needs at least one positive weight. ``start_step`` values strictly increase.
- A stage's ``seq_len`` (``None``: the trainer's ``train.seq_len``) changes the samples per
  global batch to ``train.global_batch_tokens // seq_len``.
- ``demo: true`` with no ``sources`` trains on the bundled demo corpus (:mod:`model.corpus`),
  built on first use under ``demo_dir`` (default ``<run_dir>/data``) with its default weights.
  Stages may then name the demo's sources (``code``, ``prose``, ``legal``, ``manual``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from elastic.config import check
from model.corpus import DEMO_WEIGHTS
from model.shards import is_local, local_path


@dataclass(frozen=True)
class SourceConfig:
    name: str
    url: str  # prepared shard dir of this source, or the prepare-data output dir holding <name>/
    weight: float = 1.0

    def __post_init__(self) -> None:
        check(_is_name(self.name), "name", self.name, "letters, digits, . _ - only")
        check(bool(self.url), "url", self.url, "must not be empty")
        if is_local(self.url):
            check(os.path.exists(local_path(self.url)), "url", self.url, "not found")
        check(self.weight > 0, "weight", self.weight, "must be > 0")


@dataclass(frozen=True)
class StageConfig:
    start_step: int
    weights: dict[str, float] = field(default_factory=dict)  # unlisted sources: weight 0
    seq_len: int | None = None  # None: train.seq_len

    def __post_init__(self) -> None:
        check(self.start_step >= 0, "start_step", self.start_step, "must be >= 0")
        for name, weight in self.weights.items():
            check(weight >= 0, f"weights.{name}", weight, "must be >= 0")
        check(
            any(w > 0 for w in self.weights.values()),
            "weights",
            self.weights,
            "needs at least one weight > 0",
        )
        check(self.seq_len is None or self.seq_len > 0, "seq_len", self.seq_len, "must be > 0")


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = ()
    stages: tuple[StageConfig, ...] = ()
    demo: bool = True  # with no sources: train on the bundled demo corpus
    demo_dir: str | None = None  # where the demo corpus is built; None: <run_dir>/data
    seed: int = 1234  # sampling seed (independent of the model init seed)
    eval_every_steps: int = 50  # 0 disables evaluation
    eval_batches: int = 2  # held-out batches per source per evaluation
    # fsspec options for remote source URLs (endpoint_url, key, secret, ...), passed unchanged.
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(
            bool(self.sources) or self.demo,
            "sources",
            list(self.sources),
            "give at least one source, or set data.demo: true",
        )
        names = [s.name for s in self.sources]
        for i, name in enumerate(names):
            check(name not in names[:i], f"sources[{i}].name", name, "duplicate source name")
        known = set(names) if self.sources else set(DEMO_WEIGHTS)
        previous = -1
        for i, stage in enumerate(self.stages):
            for name in stage.weights:
                check(name in known, f"stages[{i}].weights.{name}", name, "unknown source")
            check(
                stage.start_step > previous,
                f"stages[{i}].start_step",
                stage.start_step,
                "stages must start at strictly increasing steps",
            )
            previous = stage.start_step
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        check(self.eval_every_steps >= 0, "eval_every_steps", self.eval_every_steps, ">= 0")
        check(self.eval_batches > 0, "eval_batches", self.eval_batches, "must be > 0")

    @property
    def uses_demo(self) -> bool:
        return self.demo and not self.sources

    def demo_path(self, run_dir: str) -> str:
        return self.demo_dir or os.path.join(run_dir, "data")


def _is_name(text: str) -> bool:
    return bool(text) and all(c.isalnum() or c in "._-" for c in text)
