"""What ``elasticctl`` tables show people: sizes in KiB/MiB/GiB, durations and ages
("3m 12s", "3m 12s ago"), yes/no, aligned columns. Pure functions; ``--json`` output never
goes through them (it keeps bytes, seconds and booleans)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(size_bytes: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; ``None`` -> ``""`` (unknown)."""
    if size_bytes is None:
        return ""
    value, unit = float(size_bytes), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def duration(seconds: float | None) -> str:
    """``192`` -> ``3m 12s``, ``93784`` -> ``1d 2h``: the two largest units, whole seconds."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    whole = max(0, round(seconds))
    parts: list[str] = []
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= span or (unit == "s" and not parts):
            parts.append(f"{whole // span}{unit}")
            whole %= span
    return " ".join(parts[:2])


def age(then_unix: float | None, *, now_unix: float) -> str:
    """``3m 12s ago``; ``""`` when unknown; a time ahead of ours (clock skew) is ``just now``."""
    if then_unix is None:
        return ""
    seconds = now_unix - then_unix
    return "just now" if seconds < 1 else f"{duration(seconds)} ago"


def yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")


def number(value: Any, *, digits: int = 4) -> str:
    """Floats with ``digits`` significant digits, anything else as ``str`` (None: empty)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns under a dashed rule; ``None`` cells are empty."""
    cells = [[str(h) for h in header], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
