"""``elasticctl report``: a PNG of loss and grad norm over steps, from a run's JSON-lines logs.

Marked on both panels: rewinds (from ``rewind`` events: the trigger step and the step rewound
to), worker restarts (``restart`` events, at the last step completed before them) and changes
of world size (from the step lines). Steps repeated after a restart or a rewind are drawn where
they happened: the last line for a step wins, so the curve shows the run that counted.
The title and the printed summary carry the run's goodput (:mod:`ops.goodput`) from each node's
newest ``goodput`` line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ops import goodput

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass
class RunHistory:
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    rewinds: list[tuple[int, int]] = field(default_factory=list)  # (trigger, to_step)
    restarts: list[tuple[int, str]] = field(default_factory=list)  # (last step, reason)
    goodput: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> newest ledger

    def world_size_changes(self) -> list[tuple[int, int]]:
        changes, previous = [], None
        for step in sorted(self.steps):
            size = self.steps[step].get("world_size")
            if size != previous:
                changes.append((step, int(size or 0)))
                previous = size
        return changes[1:]


def read_history(paths: Iterable[str]) -> RunHistory:
    records = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("{"):
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
    records.sort(key=lambda r: r.get("ts", 0))
    history, last_step = RunHistory(), 0
    for record in records:
        event = record.get("event")
        if event == "step":
            history.steps[int(record["step"])] = record
            last_step = int(record["step"])
        elif event == "rewind":
            history.rewinds.append(
                (int(record.get("trigger_step", last_step)), int(record["to_step"]))
            )
        elif event == "restart":
            history.restarts.append((last_step, str(record.get("reason"))))
        elif event == "goodput":
            history.goodput[str(record.get("node"))] = record
    return history


def write_report(logs: Sequence[str], out: str) -> int:
    history = read_history(logs)
    if not history.steps:
        print(f"elasticctl: --log: no step lines in {', '.join(logs)}", file=sys.stderr)
        return EXIT_FAILED
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    steps = sorted(history.steps)
    fig, (ax_loss, ax_grad) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax_loss.plot(steps, [history.steps[s]["loss"] for s in steps], lw=1, color="tab:blue")
    ax_grad.plot(steps, [history.steps[s]["grad_norm"] for s in steps], lw=1, color="tab:green")
    ax_loss.set_ylabel("loss")
    ax_grad.set_ylabel("grad norm (before clipping)")
    ax_grad.set_xlabel("step")
    _mark(ax_loss, ax_grad, history)
    run_goodput = goodput.combine(history.goodput.values())
    ax_loss.set_title(
        f"elasticd run: {len(steps)} steps, {len(history.rewinds)} rewinds, "
        f"{len(history.restarts)} restarts"
        + (f", goodput {run_goodput['ratio']:.1%}" if run_goodput else "")
    )
    ax_loss.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    for line in goodput.lines(history.goodput):
        print(line)
    return EXIT_OK


def _mark(ax_loss: Any, ax_grad: Any, history: RunHistory) -> None:
    for i, (trigger, to_step) in enumerate(history.rewinds):
        for ax in (ax_loss, ax_grad):
            ax.axvspan(
                to_step,
                trigger,
                color="tab:red",
                alpha=0.12,
                label="rewound window" if i == 0 and ax is ax_loss else None,
            )
    for i, (step, reason) in enumerate(history.restarts):
        for ax in (ax_loss, ax_grad):
            ax.axvline(
                step,
                color="tab:orange",
                ls="--",
                lw=1,
                label="restart" if i == 0 and ax is ax_loss else None,
            )
        ax_grad.annotate(
            reason,
            (step, 0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            va="bottom",
        )
    for i, (step, size) in enumerate(history.world_size_changes()):
        for ax in (ax_loss, ax_grad):
            ax.axvline(
                step,
                color="tab:purple",
                ls=":",
                lw=1.5,
                label="world size change" if i == 0 and ax is ax_loss else None,
            )
        ax_loss.annotate(
            f"ws={size}", (step, 1), xycoords=("data", "axes fraction"), fontsize=7, va="top"
        )
