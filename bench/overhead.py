"""Overhead: steps/s of the full stack vs. a bare training loop, same model, batch and steps.

- bare: ``python -m model.train`` x 2 gloo ranks started directly (no daemon), guard off,
  one checkpoint at the end only (``interval_steps`` = steps), no metrics endpoint.
- full: ``elasticd run`` (embedded etcd, ``nproc_per_node 2``): daemon, heartbeats and
  control channel, guard on, metrics endpoint, a checkpoint every 50 steps.

Same job otherwise: the ``tiny`` GPT, ``SEQ`` tokens x ``MICRO`` samples per rank per step.
Runs alternate bare, full, bare, full... so both see the same machine load; steps/s is taken
between the ``ts`` of step ``WARMUP`` and of the last step (start-up excluded, the periodic
checkpoints included).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.common import Section, Target, fmt, spread, table
from model.prepare import ensure_demo
from tests.support.daemons import start_daemon, tiny_job
from tests.support.procs import events, running, write_config

TITLE = "5. Overhead of the full stack"
SEQ = 64
MICRO = 4
WARMUP = 10


def doc(work: Path, demo: Path, name: str, *, steps: int, full: bool) -> dict[str, Any]:
    return tiny_job(
        work / name,
        demo,
        endpoint=None,
        run_id=name,
        nproc_per_node=2,
        nodes={"min": 1, "max": 1},
        checkpoint={"interval_steps": 50 if full else steps, "keep_last": 3},
        guard={"enabled": full},
        model={"size": "tiny", "max_seq_len": SEQ},
        train={
            "steps": steps,
            "global_batch_tokens": 2 * MICRO * SEQ,
            "micro_batch_size": MICRO,
            "seq_len": SEQ,
            "warmup_steps": 5,
            "log_sample_ids": False,
            "threads": 1,
        },
    )


def steps_per_second(rows: list[dict[str, Any]]) -> float:
    rows = sorted(rows, key=lambda r: r["step"])
    start = next(r for r in rows if r["step"] == WARMUP)
    end = rows[-1]
    return (end["step"] - start["step"]) / (end["ts"] - start["ts"])


def bare(work: Path, demo: Path, i: int, steps: int) -> float:
    name = f"bare{i}"
    config = write_config(work / f"{name}.yaml", doc(work, demo, name, steps=steps, full=False))
    with running(config, world_size=2, log_dir=work / name / "logs") as group:
        codes = group.wait(timeout_seconds=900)
        if codes != [0, 0]:
            raise RuntimeError(f"bare run exited with {codes}")
        return steps_per_second(events(group.rank0_log, "step"))


def full(work: Path, demo: Path, i: int, steps: int) -> float:
    name = f"full{i}"
    daemon = start_daemon(
        doc(work, demo, name, steps=steps, full=True), name="a", log_dir=work / name / "logs"
    )
    try:
        code = daemon.wait(timeout_seconds=900)
        if code != 0:
            raise RuntimeError(f"elasticd exited with {code}")
        return steps_per_second(daemon.events("step"))
    finally:
        daemon.stop()


def run(work: Path, *, quick: bool) -> Section:
    demo = work / "demo"
    ensure_demo(demo)
    steps, pairs = (40, 1) if quick else (120, 2)
    results: dict[str, list[float]] = {"bare": [], "full": []}
    for i in range(pairs):
        results["bare"].append(bare(work, demo, i, steps))
        print(f"[overhead] bare {results['bare'][-1]:.2f} steps/s", file=sys.stderr, flush=True)
        results["full"].append(full(work, demo, i, steps))
        print(f"[overhead] full {results['full'][-1]:.2f} steps/s", file=sys.stderr, flush=True)
    b, f = spread(results["bare"]), spread(results["full"])
    ratio = f["median"] / b["median"]
    pair_ratios = [x / y for x, y in zip(results["full"], results["bare"], strict=True)]
    body = "\n\n".join(
        [
            __doc__.split("\n", 2)[2]
            .strip()
            .replace("``SEQ``", str(SEQ))
            .replace("``MICRO``", str(MICRO))
            .replace("``WARMUP``", str(WARMUP)),
            table(
                ["setup", "runs", "steps", "median steps/s", "min - max", "median step ms"],
                [
                    [
                        k,
                        s["n"],
                        steps,
                        fmt(s["median"], 3),
                        f"{fmt(s['min'], 3)} - {fmt(s['max'], 3)}",
                        fmt(1000 / s["median"], 0),
                    ]
                    for k, s in (("bare loop", b), ("full stack", f))
                ],
            ),
            f"full / bare steps/s: **{ratio:.3f}x** (per pair: "
            + ", ".join(f"{r:.3f}" for r in pair_ratios)
            + ").",
        ]
    )
    target = Target("full-stack throughput", ">= 0.97x bare loop", f"{ratio:.3f}x", ratio >= 0.97)
    if ratio < 0.97:
        target.note = (
            "includes a synchronous checkpoint every 50 steps (the bare loop saves once, "
            "at the end) and a daemon relaying every worker line on the same 2 cores"
        )
    return Section("overhead", TITLE, body, [target], data=results)
