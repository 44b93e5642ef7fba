"""Checkpoints: DCP on any fsspec URL with a commit protocol, retention and resharded loads.

``<checkpoint.url>/<run_id>/step-<N>/`` holds DCP files plus ``manifest.json``, written last; a
directory without a manifest is not a checkpoint. See ``docs/checkpoints.md``.

Modules: ``config`` (the YAML section), ``storage`` (the only fsspec importer), ``dcp_io``
(DCP's reader and writer: hashed writes, verified reads), ``integrity`` (digests and the
streams that compute and check them), ``streamed`` (checked chunks copied into place),
``in_place`` (tensors viewed in checked bytes), ``signing`` (the key, the manifest's HMAC),
``manifest`` (commit record), ``retention`` (pure deletion policy), ``collective``
(rank-0-decides broadcasts), ``manager`` (save/load/retire), ``staging`` (async-save CPU
copies, reused), ``model_state`` (model + optimizer state helpers ``app_state`` and
``restore_app_state``: a module named ``app_state``, once imported, would shadow the function
the package exports lazily under that name), ``priority`` (niceness of async-save threads),
``errors``.

Importing the package does not import torch: ``CheckpointManager`` and the app-state helpers
load on first use, so configuration, manifests and storage stay light (``elasticctl``).
"""

from typing import TYPE_CHECKING, Any

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
from elastic.checkpoint.manifest import Manifest
from elastic.checkpoint.storage import Storage

if TYPE_CHECKING:
    from elastic.checkpoint.manager import CheckpointManager
    from elastic.checkpoint.model_state import app_state, restore_app_state

_LAZY = {
    "CheckpointManager": "elastic.checkpoint.manager",
    "app_state": "elastic.checkpoint.model_state",
    "restore_app_state": "elastic.checkpoint.model_state",
}


def __getattr__(name: str) -> Any:
    """The torch-bound names, imported on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


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
