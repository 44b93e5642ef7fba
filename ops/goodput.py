"""Run-level goodput from the nodes' ledgers, and its text for ``elasticctl status`` and report.

Each daemon publishes its ledger (``daemon/goodput.py``) as ``goodput`` in its node status and
logs it as a ``goodput`` line at every round end and when it stops. The run's goodput is the
wall-time-weighted mean over nodes: productive and badput seconds summed over the nodes, divided
by their summed wall time, so a node that lived longer weighs more and the run's figure does
not depend on which node hosts rank 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def combine(ledgers: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The run's goodput from node summaries (``Summary.to_json()`` shapes); None: none given."""
    wall = productive = 0.0
    badput: dict[str, float] = {}
    seen = False
    for ledger in ledgers:
        seen = True
        wall += float(ledger.get("wall_seconds") or 0.0)
        productive += float(ledger.get("productive_seconds") or 0.0)
        for kind, seconds in (ledger.get("badput_seconds") or {}).items():
            badput[kind] = badput.get(kind, 0.0) + float(seconds)
    if not seen:
        return None
    return {
        "wall_seconds": round(wall, 3),
        "productive_seconds": round(productive, 3),
        "ratio": round(productive / wall, 4) if wall > 0 else 0.0,
        "badput_seconds": {k: round(v, 3) for k, v in badput.items()},
    }


def member_ledgers(members: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Per node, the ``goodput`` of its status (nodes without one are left out)."""
    return {
        node: info["goodput"]
        for node, info in sorted(members.items())
        if isinstance(info, Mapping) and isinstance(info.get("goodput"), Mapping)
    }


def lines(per_node: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Readable lines: the run's goodput and its badput by kind, then one line per node."""
    run = combine(per_node.values())
    if run is None:
        return []
    out = [f"goodput {_describe(run)}"]
    out += [f"  {node}: {_describe(ledger)}" for node, ledger in sorted(per_node.items())]
    return out


def _describe(ledger: Mapping[str, Any]) -> str:
    badput = {k: v for k, v in (ledger.get("badput_seconds") or {}).items() if v >= 0.05}
    kinds = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(badput.items(), key=lambda kv: -kv[1]))
    return (
        f"{float(ledger.get('ratio') or 0.0):.1%} of {float(ledger.get('wall_seconds') or 0):.1f} s"
        f" (productive {float(ledger.get('productive_seconds') or 0):.1f} s"
        + (f"; badput: {kinds})" if kinds else ")")
    )
