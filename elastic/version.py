"""The installed elasticd's version, for ``elasticd --version`` and ``elasticctl --version``."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "elasticd"


def package_version(distribution: str = DISTRIBUTION) -> str:
    """The version in the distribution's metadata; ``unknown`` when it is not installed (a
    checkout on ``PYTHONPATH``)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"
