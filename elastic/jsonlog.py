"""JSON-lines logging through structlog, shared by the daemon and its workers.

Every line is one JSON object on stdout with ``event`` (what happened), ``ts`` (unix seconds),
``level`` and whatever context is bound (``run_id``, ``node``, ``rank``, ``step`` where known).
Lifecycle events and per-step lines use the ``event`` values listed in docs/architecture.md; the
daemon relays worker lines, so worker lines must stay one object per line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog


def _timestamp(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict.setdefault("ts", round(time.time(), 3))
    return event_dict


def configure(*, stream: TextIO | None = None, level: str = "info", **context: Any) -> None:
    """Configure structlog for JSON lines and bind ``context`` (run_id, node, rank...)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # No stream: the process's stdout *when a line is written* (structlog then prints to
        # whatever sys.stdout is), not the object it is now: a logger bound before a later
        # swap of sys.stdout (pytest's capture, a redirect) would write to a closed file.
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    bind(**context)


def bind(**context: Any) -> None:
    """Add fields to every following line of this process (e.g. ``step`` after a load)."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in context.items() if v is not None})


def get(name: str | None = None) -> Any:
    """A structlog logger; ``name`` becomes the ``logger`` field when given."""
    log = structlog.get_logger()
    return log.bind(logger=name) if name else log
