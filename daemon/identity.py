"""Who may join a run: the config fingerprint every node publishes, and the checks on it.

Two nodes of one ``run_id`` must train the same job: a node started with another model, data
or checkpoint location would corrupt the run's checkpoints silently. Every daemon publishes a
fingerprint of its typed config (defaults filled in) in its node key; a node whose fingerprint
differs from a live member's is refused before it registers (exit 2, one line naming both).

What it covers is a list of what defines the job, not everything in the file: the workload
(``model``, ``data``, ``train``), ``nproc_per_node``, ``worker.command``, ``guard``, ``rewind``
and ``checkpoint`` without ``storage_options``. Left out, on purpose:

- per-node settings: ``nodes`` (address; ``min``/``max`` also change live through
  ``elasticctl scale`` without touching any file), ``metrics``, ``run_dir``, ``etcd``,
  ``worker.env`` and ``worker.cwd`` (interfaces and paths may differ between node types),
  ``watchdog``, ``drain``, and ``faults`` (drills target one node's ranks);
- secrets: every key of :data:`daemon.config.SECRETS` is removed before hashing, wherever it
  sits (``data.storage_options`` inside the covered ``data`` section too). A hash of a
  low-entropy secret can be brute-forced offline: none goes into etcd, even hashed, and a
  changed password or rotated key does not make a node look like another job.

The node-id check (a live lease holds the id) is :class:`elastic.rendezvous.NodeIdTaken`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from daemon.config import without_secrets

FINGERPRINT_KEY = "config_fingerprint"  # the field in each node's published status
# (section, keys or None for the whole section): what defines the job.
COVERED: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("model", None),
    ("data", None),
    ("train", None),
    ("nproc_per_node", None),
    ("guard", None),
    ("rewind", None),
    ("worker", ("command",)),
    ("checkpoint", ("url", "interval_steps", "keep_last", "async")),
)


def fingerprint(document: Mapping[str, Any]) -> str:
    """sha256 (hex, first 16 digits) of the covered part of the resolved document."""
    return hashlib.sha256(canonical(document).encode()).hexdigest()[:16]


def canonical(document: Mapping[str, Any]) -> str:
    """The text :func:`fingerprint` hashes: the covered keys, secrets removed, as JSON."""
    public = without_secrets(document)
    covered: dict[str, Any] = {}
    for section, keys in COVERED:
        value = public.get(section)
        if keys is not None and isinstance(value, Mapping):
            value = {k: value[k] for k in keys if k in value}
        covered[section] = value
    return json.dumps(covered, sort_keys=True, separators=(",", ":"), default=str)


def mismatch(own: str, members: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One line naming a live member whose published fingerprint differs from ``own``, or
    None. Members that publish none (older daemons, a status not yet written) are not judged."""
    for node, info in sorted(members.items()):
        theirs = info.get(FINGERPRINT_KEY)
        if isinstance(theirs, str) and theirs != own:
            return (
                f"config fingerprint {own} differs from live node {node!r} ({theirs}): "
                "every node of a run must train the same job (model, data, train, checkpoint, "
                "guard, worker)"
            )
    return None
