"""Checkpoints: DCP on any fsspec URL with a commit protocol, retention and resharded loads.

``<checkpoint.url>/<run_id>/step-<N>/`` holds DCP files plus ``manifest.json``, written last; a
directory without a manifest is not a checkpoint. See ``docs/checkpoints.md``.

Modules: ``config`` (the YAML section), ``storage`` (the only fsspec importer), ``dcp_io``
(DCP's reader and writer: hashed writes, verified reads), ``integrity`` (digests and the
streams that compute and check them), ``signing`` (the key, the manifest's HMAC),
``manifest`` (commit record), ``retention`` (pure deletion policy), ``collective``
(rank-0-decides broadcasts), ``manager`` (save/load/retire), ``staging`` (async-save CPU
copies, reused), ``app_state`` (model + optimizer state helpers), ``priority`` (niceness of
async-save threads), ``errors``.
"""

from elastic.checkpoint.app_state import app_state, restore_app_state
from elastic.checkpoint.config import CheckpointConfig
from elastic.checkpoint.errors import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    CheckpointUntrusted,
    StagedStateChanged,
    StorageError,
    TemporaryStorageError,
)
from elastic.checkpoint.manager import CheckpointManager
from elastic.checkpoint.manifest import Manifest
from elastic.checkpoint.storage import Storage

__all__ = [
    "CheckpointConfig",
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointExists",
    "CheckpointManager",
    "CheckpointNotFound",
    "CheckpointUntrusted",
    "Manifest",
    "StagedStateChanged",
    "Storage",
    "StorageError",
    "TemporaryStorageError",
    "app_state",
    "restore_app_state",
]
