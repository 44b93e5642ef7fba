"""Run-level goodput from the nodes' ledgers, and its text for ``elasticctl status`` and report.

Each daemon publishes its ledger (``daemon/goodput.py``) as ``goodput`` in its node status and
logs it as a ``goodput`` line at every round end and when it stops. The run's goodput is the
wall-time-weighted mean over nodes: productive and badput seconds summed over the nodes, divided
by their summed wall time, so a node that lived longer weighs more and the run's figure does
not depend on which node hosts rank 0.

A node writes its record only when something others act on changes (docs/rendezvous.md), so a
published ledger is as of its ``as_of_unix`` stamp; :func:`advance` brings it to now with its
``rates`` (the share of each second going to each bucket since then, e.g. all of it to
``paused`` while paused). The result is an estimate between writes (a blocking save counts as
training until the node's next write, and steps redone after a crash move to ``recompute``
only when the node writes again); the ``goodput`` log lines at round ends are exact.
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


def member_ledgers(
    members: Mapping[str, Any], *, now_unix: float | None = None
) -> dict[str, Mapping[str, Any]]:
    """Per node, the ``goodput`` of its status (nodes without one are left out), advanced to
    ``now_unix`` when given."""
    return {
        node: info["goodput"] if now_unix is None else advance(info["goodput"], now_unix)
        for node, info in sorted(members.items())
        if isinstance(info, Mapping) and isinstance(info.get("goodput"), Mapping)
    }


def advance(ledger: Mapping[str, Any], now_unix: float) -> dict[str, Any]:
    """``ledger`` extrapolated from its ``as_of_unix`` to ``now_unix`` with its ``rates`` (a
    ledger without both, or stamped later than now, is returned as it is)."""
    as_of, rates = ledger.get("as_of_unix"), ledger.get("rates")
    if not isinstance(as_of, (int, float)) or not isinstance(rates, Mapping) or not rates:
        return dict(ledger)
    elapsed = max(0.0, now_unix - float(as_of))
    productive = float(ledger.get("productive_seconds") or 0.0)
    badput = {k: float(v) for k, v in (ledger.get("badput_seconds") or {}).items()}
    for bucket, share in rates.items():
        if bucket == "productive":
            productive += float(share) * elapsed
        else:
            badput[bucket] = badput.get(bucket, 0.0) + float(share) * elapsed
    wall = float(ledger.get("wall_seconds") or 0.0) + elapsed
    return {
        **ledger,
        "wall_seconds": round(wall, 3),
        "productive_seconds": round(productive, 3),
        "ratio": round(productive / wall, 4) if wall > 0 else 0.0,
        "badput_seconds": {k: round(v, 3) for k, v in badput.items()},
        "as_of_unix": round(max(float(as_of), now_unix), 3),
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
