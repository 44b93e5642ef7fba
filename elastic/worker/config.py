"""The sections of the job config that the worker API acts on, and where it finds them.

A training loop under elasticd reads the resolved job config that its daemon wrote (the path is
in ``Env.CONFIG``); a loop started by hand or by plain torchrun may name a file, or use the
defaults. Precedence as everywhere: defaults < YAML < ``ELASTICD_*`` env (outside a daemon).
The API owns ``run_id``, ``run_dir``, ``checkpoint``, ``guard``, ``rewind`` and ``faults``;
the other sections (``model``, ``data``, ``train``, the daemon's own) are not its business and
are left to whoever reads them: :attr:`RunConfig.document` keeps the whole mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from elastic.checkpoint.config import CheckpointConfig
from elastic.config import ConfigError, build, check_name, layered
from elastic.faults import FaultConfig, require_permission
from elastic.guard.config import GuardConfig, RewindConfig
from elastic.protocol import Env

API_SECTIONS = ("run_id", "run_dir", "checkpoint", "guard", "rewind", "faults")


@dataclass(frozen=True)
class RunConfig:
    """What the worker API needs of the job config."""

    run_id: str = "demo"
    """Names the run: checkpoints live under ``<checkpoint.url>/<run_id>/``."""
    run_dir: str = "./runs/demo"
    """Local working directory of the run (logs, the daemon's files)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    rewind: RewindConfig = field(default_factory=RewindConfig)
    faults: tuple[FaultConfig, ...] = ()
    document: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The whole resolved document, other sections included (read-only by convention)."""

    def __post_init__(self) -> None:
        check_name("run_id", self.run_id)

    def section(self, name: str) -> dict[str, Any]:
        """Another section of the job config as a plain mapping (``{}`` when absent)."""
        value = self.document.get(name) or {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}={value!r}: must be a mapping")
        return dict(value)


def load(path: str | None, *, environ: Mapping[str, str]) -> RunConfig:
    """The worker's config: ``path``, else the daemon's resolved file, else the defaults.

    Raises :class:`ConfigError` (one line naming the key and value) on bad input, and when
    ``faults`` are configured without ``ELASTICD_ALLOW_FAULTS=1``.
    """
    source = path or environ.get(Env.CONFIG) or None
    document = layered(source, environ=environ)
    picked = {k: document[k] for k in API_SECTIONS if k in document}
    config = build(RunConfig, picked)
    require_permission(config.faults, environ)
    return dataclasses.replace(config, document=document)
