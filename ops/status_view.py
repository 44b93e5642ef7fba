"""``elasticctl status``: the run's status document, gathered from etcd, and its table.

Everything shown is what the daemons published; nothing is estimated without its inputs:

- the run status (rank 0's node, on changes and at most every 30 s while steps advance): state,
  round, world size, node bounds, last step, checkpoint URL, and ``train``, the numbers of the
  newest step line (loss, tokens/s, step seconds, total steps when the loop's step line has
  them) with the time they arrived;
- each live node's record (``group/nodes/``): state, last step, restarts, last failure, goodput;
- the event log: the newest ``checkpoint_commit`` (its step and time: the checkpoint's age).

Derived here: ``eta_seconds`` (steps left at the newest step's pace: only with a total and a
step time) and the ages of the step numbers and of the checkpoint. A field without its data is
absent from ``--json`` and blank in the table. No torch is imported on this path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from elastic.rendezvous import RunStore
from ops import goodput, human

CHECKPOINT_COMMIT = "checkpoint_commit"
EVENTS_READ = 1000  # the event log's default window: the newest commit is almost always in it


def gather(store: RunStore, *, now_unix: float) -> dict[str, Any] | None:
    """The status document ``--json`` prints (None: the run has no status yet)."""
    status = store.get_status()
    if status is None:
        return None
    status["members"] = members(status, store.members())
    per_node = goodput.member_ledgers(status["members"], now_unix=now_unix)
    for node, ledger in per_node.items():  # as of now, not of each node's last write
        status["members"][node]["goodput"] = ledger
    if per_node:
        status["goodput"] = goodput.combine(per_node.values())
    checkpoint = newest_checkpoint(store.events(limit=EVENTS_READ))
    if checkpoint is not None:
        status["last_checkpoint"] = checkpoint
    eta = eta_seconds(status)
    if eta is not None:
        status["eta_seconds"] = eta
    status["now_unix"] = round(now_unix, 3)
    return status


def members(status: Mapping[str, Any], records: Mapping[str, Any]) -> dict[str, Any]:
    """Live nodes' records with their round and group rank (ranks follow the order of the
    round's ``nodes``; a node outside the round has neither)."""
    ranks = {name: rank for rank, name in enumerate(status.get("nodes") or [])}
    return {
        node: {
            **info,
            "round": status.get("round") if node in ranks else None,
            "group_rank": ranks.get(node),
        }
        for node, info in records.items()
    }


def newest_checkpoint(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``{"step", "time_unix"}`` of the newest ``checkpoint_commit`` event, if any."""
    for event in reversed(events):
        if event.get("event") == CHECKPOINT_COMMIT and isinstance(event.get("ts"), (int, float)):
            return {"step": event.get("step"), "time_unix": event["ts"]}
    return None


def last_step(status: Mapping[str, Any]) -> int | None:
    """The newest step either the run status or its step numbers name."""
    train = status.get("train") or {}
    steps = [s for s in (status.get("last_step"), train.get("step")) if isinstance(s, int)]
    return max(steps) if steps else None


def eta_seconds(status: Mapping[str, Any]) -> float | None:
    """Steps left times the newest step's time; None without a total or a step time."""
    train = status.get("train") or {}
    total, pace, step = train.get("total_steps"), train.get("step_seconds"), last_step(status)
    if not isinstance(total, int) or not isinstance(pace, (int, float)) or step is None:
        return None
    return round(max(total - step, 0) * pace, 1)


def render(status: Mapping[str, Any], *, now_unix: float) -> str:
    """The run table, the members table, failures and goodput: what a person reads."""
    parts = [human.table(["field", "value"], run_rows(status, now_unix=now_unix))]
    nodes = status.get("members") or {}
    if nodes:
        parts.append(human.table(MEMBER_HEADER, member_rows(nodes)))
    lines = failure_lines(nodes)
    text = "\n\n".join(parts) + ("\n" + "\n".join(lines) if lines else "")
    ledgers = {n: i["goodput"] for n, i in nodes.items() if isinstance(i.get("goodput"), Mapping)}
    if ledgers:
        text += "\n\n" + "\n".join(goodput.lines(ledgers))
    return text


def run_rows(status: Mapping[str, Any], *, now_unix: float) -> list[tuple[str, str]]:
    train = status.get("train") or {}
    as_of = human.age(train.get("time_unix"), now_unix=now_unix)
    checkpoint = status.get("last_checkpoint") or {}
    rows = [
        ("state", human.number(status.get("state"))),
        ("round", human.number(status.get("round"))),
        ("world size", _world(status)),
        ("step", _step(status)),
        ("eta", _eta(status)),
        ("loss", _with_age(human.number(train.get("loss")), as_of)),
        ("tokens/s", _with_age(human.number(train.get("tokens_per_s"), digits=6), as_of)),
        ("step time", _with_age(_seconds(train.get("step_seconds")), as_of)),
        ("checkpoint", _checkpoint(checkpoint, now_unix=now_unix)),
        ("nodes min/max", f"{status.get('min_nodes', '')}/{status.get('max_nodes', '')}"),
        ("checkpoint url", human.number(status.get("checkpoint_url"))),
    ]
    return rows


MEMBER_HEADER = ["node", "state", "round", "group_rank", "last_step", "restarts"]


def member_rows(nodes: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (
            n,
            i.get("state"),
            i.get("round"),
            i.get("group_rank"),
            i.get("last_step"),
            i.get("restarts"),
        )
        for n, i in sorted(nodes.items())
    ]


def failure_lines(members: Mapping[str, Any]) -> list[str]:
    """Per node with a ``last_failure`` in its status: the command, exit code and last output
    lines of its newest failed worker (a loop's traceback is usually all there is to see)."""
    import shlex

    lines: list[str] = []
    for node, info in sorted(members.items()):
        failure = info.get("last_failure") if isinstance(info, Mapping) else None
        if not isinstance(failure, Mapping):
            continue
        lines += [
            "",
            f"last failure on {node}: local rank {failure.get('local_rank')}, "
            f"exit code {failure.get('returncode')}",
            f"  command: {shlex.join(str(a) for a in failure.get('command') or [])}",
            *(f"  | {text}" for text in failure.get("output_tail") or []),
        ]
    return lines


def _world(status: Mapping[str, Any]) -> str:
    world, nodes = status.get("world_size"), status.get("nodes")
    nproc = status.get("nproc_per_node")
    if world is None:
        return ""
    if isinstance(nodes, list) and nproc:
        return f"{world} ({len(nodes)} nodes x {nproc})"
    return str(world)


def _step(status: Mapping[str, Any]) -> str:
    step, total = last_step(status), (status.get("train") or {}).get("total_steps")
    if step is None:
        return ""
    if isinstance(total, int) and total > 0:
        return f"{step} / {total} ({100 * step / total:.1f}%)"
    return str(step)


def _eta(status: Mapping[str, Any]) -> str:
    eta = status.get("eta_seconds")
    if eta is None:
        return ""
    return f"{human.duration(eta)} (at the newest step's pace)"


def _checkpoint(checkpoint: Mapping[str, Any], *, now_unix: float) -> str:
    if not checkpoint:
        return ""
    when = human.age(checkpoint.get("time_unix"), now_unix=now_unix)
    return f"step {checkpoint.get('step')}, {when}"


def _seconds(value: Any) -> str:
    return f"{value:.3g} s" if isinstance(value, (int, float)) else ""


def _with_age(text: str, as_of: str) -> str:
    return f"{text} ({as_of})" if text and as_of else text
