"""Replacing a local file atomically: readers see the old content or the new, never a mix.

One rule for every file the daemon, the workers and the data tools rewrite in place
(heartbeats, the resolved config, checkpoint manifests, prepared-corpus indexes): write a
temporary file in the same directory under a name no other process or thread uses, then
``os.replace`` it over the target. ``durable=True`` adds the fsyncs that make the new content
survive a power loss (file before the rename, directory after); heartbeats skip them.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["replace_file"]


def replace_file(
    path: str | os.PathLike[str], data: bytes, *, durable: bool = False, mode: int = 0o644
) -> None:
    """Put ``data`` at ``path`` in one step, creating the parent directory if needed. The
    temporary file is created with ``mode`` (0o600: never readable by others, not even for a
    moment), so the target has it from the start.

    On failure the target keeps its old content and the temporary file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # pid + random: daemons sharing a directory, and threads of one process, never share it.
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
